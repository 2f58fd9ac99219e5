//! The resident engine: the model lives on its own OS thread and scores packed micro-batches.
