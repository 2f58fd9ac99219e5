//! The chart's values and examples ask only for a precision their GPU nodes run: each file's
//! `config.model.dtype` is checked with the engine's own choice
//! ([`scorestream::engine::cuda::precision::choose`]) against the GPU product its nodeSelector
//! pins, or, when it pins none, against every GPU generation the engine runs on (Ampere, Ada,
//! Hopper). A new example that pins an unknown product fails here until it is added below.

use scorestream::engine::cuda::precision::{choose, GpuFacts};
use scorestream::model::Dtype;

/// `nvidia.com/gpu.product` labels (GPU feature discovery) and their compute capability.
const PRODUCTS: [(&str, (i32, i32)); 8] = [
    ("NVIDIA-A100", (8, 0)),
    ("NVIDIA-A10", (8, 6)),
    ("NVIDIA-A40", (8, 6)),
    ("NVIDIA-L40S", (8, 9)),
    ("NVIDIA-L4", (8, 9)),
    ("NVIDIA-H100", (9, 0)),
    ("NVIDIA-H200", (9, 0)),
    ("Tesla-T4", (7, 5)),
];

/// The value of the first `key:` line under the top-level `section:` (two-space nesting).
fn value_in(text: &str, section: &str, key: &str) -> Option<String> {
    let mut inside = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            inside = line.trim_end() == format!("{section}:");
            continue;
        }
        let t = line.trim();
        if inside && t.starts_with(&format!("{key}:")) {
            return Some(t[key.len() + 1..].split('#').next().unwrap_or_default().trim().trim_matches('"').to_owned());
        }
    }
    None
}

fn gpu(label: &str) -> GpuFacts {
    let (_, (major, minor)) = PRODUCTS
        .iter()
        .filter(|(p, _)| label.starts_with(p))
        .max_by_key(|(p, _)| p.len())
        .unwrap_or_else(|| panic!("GPU product {label:?} is not in PRODUCTS: add it with its compute capability"));
    GpuFacts { ordinal: 0, name: label.to_owned(), major: *major, minor: *minor }
}

fn dtype(name: &str) -> Dtype {
    serde_json::from_value(serde_json::Value::from(name)).unwrap_or_else(|e| panic!("dtype {name:?}: {e}"))
}

#[test]
fn every_example_runs_on_the_gpus_it_pins() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helm");
    let mut files: Vec<_> = std::fs::read_dir(root.join("examples")).expect("helm/examples").map(|e| e.expect("entry").path()).collect();
    files.push(root.join("scorestream/values.yaml"));
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).expect("values file");
        let Some(d) = value_in(&text, "config", "dtype") else { continue };
        let product = value_in(&text, "nodeSelector", "nvidia.com/gpu.product");
        let gpus: Vec<GpuFacts> = match &product {
            Some(p) => vec![gpu(p)],
            // Unpinned: any node from Ampere on may get the pod.
            None => ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A10", "NVIDIA-L40S", "NVIDIA-H100-80GB-HBM3"].map(gpu).to_vec(),
        };
        for g in &gpus {
            if let Err(e) = choose(dtype(&d), std::slice::from_ref(g)) {
                panic!("{}: dtype {d:?} on {}: {e}", f.display(), g.name);
            }
        }
        checked += 1;
    }
    assert!(checked >= 4, "values.yaml and the three model examples, found {checked}");
}

#[test]
fn the_check_refuses_what_the_engine_refuses() {
    assert!(choose(dtype("fp8"), &[gpu("NVIDIA-A100-SXM4-80GB")]).is_err());
    assert!(choose(dtype("auto"), &[gpu("Tesla-T4")]).is_err());
    assert!(choose(dtype("fp8"), &[gpu("NVIDIA-L40S")]).is_ok());
    assert_eq!(gpu("NVIDIA-A10G").major, 8);
    assert_eq!((gpu("NVIDIA-L4").major, gpu("NVIDIA-L4").minor), (8, 9));
    let text = "config:\n  model:\n    dtype: fp8 # x\nnodeSelector:\n  nvidia.com/gpu.product: NVIDIA-L40S\n";
    assert_eq!(value_in(text, "config", "dtype").as_deref(), Some("fp8"));
    assert_eq!(value_in(text, "nodeSelector", "nvidia.com/gpu.product").as_deref(), Some("NVIDIA-L40S"));
    assert_eq!(value_in(text, "config", "nvidia.com/gpu.product"), None);
}
