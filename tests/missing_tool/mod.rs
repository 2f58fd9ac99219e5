//! The one policy for a tool or file a test needs and cannot find (helm, Apache Kafka,
//! nats-server (Debian's or a current one), NVRTC, bash and python3, the Llama-3 tokenizer):
//! outside CI the test is skipped, saying what is missing and how to get it; when `CI` is set
//! the absence is a failure, so that CI never passes a test it did not run.

/// `what` is missing (`how`: how to install it). Fails the test when `CI` is set; else prints
/// why it is skipped, and the caller returns without testing.
pub fn skip_or_fail(what: &str, how: &str) {
    let msg = format!("{what}: {how}");
    assert!(std::env::var_os("CI").is_none(), "{msg} (CI is set, so a missing tool is a failure)");
    eprintln!("skipped: {msg}");
}
