//! The Helm chart (helm/scorestream) with its default values and every file in helm/examples/:
//! `helm lint --strict` passes; every rendered manifest validates against the Kubernetes 1.30
//! schemas (kubernetes-validate) or, for KEDA and prometheus-operator resources, against the
//! schemas in tests/helm/schemas; the rendered worker config passes `scorestream check-config`;
//! no secret reaches a ConfigMap; the dashboard and the alerts name only metrics the worker
//! exports; and the GPU, shutdown, probe and autoscaling settings follow the worker config.
//!
//! Needs helm and kubernetes-validate (`scripts/install_helm.sh`); skipped without them unless
//! `CI` is set, where their absence fails the tests.

mod missing_tool;
#[path = "helm/support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};

use scorestream::config::{Config, ConfigError, SinkConfig, SourceConfig};
use serde_json::Value;
use support::{config_toml, find_kind, one, strings, worker, Tools};

const EXPECTED_EXAMPLES: [&str; 6] = ["kafka", "nats", "multi-gpu", "keda-kafka", "keda-nats", "monitoring"];

fn tools() -> Option<Tools> {
    support::tools()
}

#[test]
fn chart_lints_strict_with_every_values_file() {
    let Some(t) = tools() else { return };
    let cases = support::cases();
    for name in EXPECTED_EXAMPLES {
        assert!(cases.iter().any(|(n, _)| n == name), "helm/examples/{name}.yaml is missing");
    }
    for (name, args) in cases {
        let mut all = strings(&["lint", "--strict", support::CHART]);
        all.extend(args);
        let out = support::run(&t.helm, &all, &[]);
        assert!(out.ok, "helm lint --strict ({name}) failed:\n{}{}", out.stdout, out.stderr);
    }
}

#[test]
fn every_rendered_manifest_validates() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in support::cases() {
        // Custom resources are checked by render() against tests/helm/schemas.
        let docs = t.render(&args, dir.path());
        let file = dir.path().join("rendered.yaml");
        let argv = strings(&["--strict", "-k", "1.30.0", "--quiet", file.to_str().unwrap()]);
        let out = support::run(&t.validate, &argv, &[]);
        assert!(
            out.ok && !out.stdout.contains("ERROR"),
            "{name}: kubernetes-validate failed:\n{}{}",
            out.stdout,
            out.stderr
        );
        // kubernetes-validate only warns about kinds it has no schema for: those must be ours.
        for line in out.stdout.lines().filter(|l| l.starts_with("WARN")) {
            let known = ["ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"]
                .iter()
                .any(|k| line.contains(&format!("kind {k} ")));
            assert!(known, "{name}: unexpected warning: {line}");
        }
        assert_eq!(one(&docs, "Deployment")["metadata"]["name"], "rel-scorestream", "{name}");
    }
}

/// Run the worker's own check on a rendered config: the library (always) and the binary.
fn check_config(name: &str, text: &str, dir: &std::path::Path) -> Config {
    let parsed: toml::Table = text.parse().unwrap_or_else(|e| panic!("{name}: config.toml is not TOML: {e}\n{text}"));
    // A build whose engine cannot run "cuda:N" refuses those devices (a CPU-only build, or the
    // CUDA build before its engine exists); check the rest of the config there with as many "cpu"
    // stages. The device names themselves are checked by gpu_requests_follow_model_devices.
    let devices = parsed["model"]["devices"].as_array().map_or(0, Vec::len);
    let cpu = format!("[{}]", vec!["\"cpu\""; devices].join(","));
    let mut env: Vec<(&str, &str)> = vec![];
    let config = match Config::from_toml_with_env(text, name, std::iter::empty()) {
        Err(ConfigError::Invalid { field, .. }) if field == "model.devices" => {
            env.push(("SCORESTREAM__MODEL__DEVICES", cpu.as_str()));
            let vars = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
            Config::from_toml_with_env(text, name, vars)
        }
        other => other,
    }
    .unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_scorestream"));
    let out = support::run(bin, &strings(&["check-config", "--config", file.to_str().unwrap()]), &env);
    assert!(out.ok, "{name}: scorestream check-config failed:\n{}{}", out.stdout, out.stderr);
    config
}

#[test]
fn rendered_config_passes_check_config() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in support::cases() {
        let docs = t.render(&args, dir.path());
        let config = check_config(&name, &config_toml(&docs), dir.path());
        let w = worker(&docs);
        // The chart owns model.path (the model volume) and http.listen (the probed port).
        let model_mount = w["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "model").unwrap();
        let mount = model_mount["mountPath"].as_str().unwrap();
        assert!(config.model.path.starts_with(mount), "{name}: model.path {:?} outside {mount}", config.model.path);
        assert_eq!(i64::from(config.http.listen.port()), w["ports"][0]["containerPort"].as_i64().unwrap(), "{name}");
        let config_arg = w["args"].as_array().unwrap().last().unwrap().as_str().unwrap();
        assert!(config_arg.ends_with("/config.toml"), "{name}: worker args {}", w["args"]);
    }
}

#[test]
fn termination_grace_period_exceeds_shutdown_timeout() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in support::cases() {
        let docs = t.render(&args, dir.path());
        let config = check_config(&name, &config_toml(&docs), dir.path());
        let grace =
            one(&docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > config.shutdown_timeout.as_secs(), "{name}: grace {grace}s <= {:?}", config.shutdown_timeout);
    }
    let docs = t.render(&strings(&["--set", "config.shutdown_timeout=2m 30s"]), dir.path());
    assert_eq!(one(&docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 165);
    let err = t
        .template_raw(&strings(&["--set", "config.shutdown_timeout=60s", "--set", "terminationGracePeriodSeconds=30"]))
        .unwrap_err();
    assert!(err.contains("must exceed config.shutdown_timeout"), "{err}");
}

#[test]
fn gpu_requests_follow_model_devices() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gpus = |args: &[&str]| {
        let docs = t.render(&strings(args), dir.path());
        let r = &worker(&docs)["resources"];
        (r["limits"]["nvidia.com/gpu"].as_i64(), r["requests"]["nvidia.com/gpu"].as_i64())
    };
    assert_eq!(gpus(&[]), (Some(1), Some(1)));
    assert_eq!(gpus(&["-f", "helm/examples/multi-gpu.yaml"]), (Some(4), Some(4)));
    assert_eq!(gpus(&["--set-json", r#"config.model.devices=["cuda:0","cuda:0","cuda:1"]"#]), (Some(2), Some(2)));
    assert_eq!(gpus(&["--set-json", r#"config.model.devices=["cpu"]"#]), (None, None));
    // Every cuda device of every example names a GPU the pod gets (index < count).
    for (name, args) in support::cases() {
        let docs = t.render(&args, dir.path());
        let cfg: toml::Table = config_toml(&docs).parse().unwrap();
        let count = worker(&docs)["resources"]["limits"]["nvidia.com/gpu"].as_i64().unwrap_or(0);
        for d in cfg["model"]["devices"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            let idx: i64 = d.strip_prefix("cuda:").map(|i| i.parse().expect("cuda:N")).unwrap_or(-1);
            assert!(d == "cpu" || (0..count).contains(&idx), "{name}: device {d} with {count} GPUs");
        }
    }
}

#[test]
fn pod_runs_non_root_on_a_read_only_root_with_writable_caches() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docs = t.render(&strings(&["-f", "helm/examples/multi-gpu.yaml"]), dir.path());
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["runtimeClassName"], "nvidia");
    assert_eq!(pod["priorityClassName"], "scorestream-critical");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
    assert!(pod["tolerations"][0]["key"] == "nvidia.com/gpu" && pod["affinity"]["podAntiAffinity"].is_object());
    let w = worker(&docs);
    assert_eq!(w["securityContext"]["readOnlyRootFilesystem"], true);
    let mounts = w["volumeMounts"].as_array().unwrap();
    let empty_dirs: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["emptyDir"].is_object())
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let writable: Vec<&str> = mounts
        .iter()
        .filter(|m| m["readOnly"] != true && empty_dirs.contains(m["name"].as_str().unwrap()))
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let env = |name: &str| {
        w["env"].as_array().unwrap().iter().find(|e| e["name"] == name).map(|e| e["value"].as_str().unwrap().to_owned())
    };
    for var in ["CUDA_CACHE_PATH", "SCORESTREAM_KERNEL_CACHE", "HOME"] {
        let path = env(var).unwrap_or_else(|| panic!("{var} unset"));
        assert!(
            writable.iter().any(|m| path.starts_with(m)),
            "{var}={path} is not on a writable emptyDir {writable:?}"
        );
    }
    // Probes: health for liveness, readiness for traffic, and time for a 70B load (>= 30 min).
    assert_eq!(w["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(w["readinessProbe"]["httpGet"]["path"], "/readyz");
    let s = &w["startupProbe"];
    // /healthz is 503 until the model has loaded: the startup probe waits on the load.
    assert_eq!(s["httpGet"]["path"], "/healthz");
    assert!(s["periodSeconds"].as_u64().unwrap() * s["failureThreshold"].as_u64().unwrap() >= 1800);
    assert_eq!(one(&docs, "PodDisruptionBudget")["spec"]["maxUnavailable"], 1);
}

/// Every env variable that names a token or password must come from a Secret.
fn assert_secret_env(name: &str, container: &Value) {
    for e in container["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap();
        if ["TOKEN", "PASSWORD"].iter().any(|s| var.contains(s)) {
            assert!(
                e.get("value").is_none() && e["valueFrom"]["secretKeyRef"].is_object(),
                "{name}: {var} not from a Secret"
            );
        }
    }
}

#[test]
fn secrets_never_reach_a_configmap() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    const SENTINEL: &str = "S3NT1NEL-not-for-configmaps";
    // Secrets written into the config tree are refused, and the value is printed nowhere.
    for set in [
        format!("config.source.options.sasl\\.password={SENTINEL}"),
        format!("config.sink.options.sasl\\.oauthbearer\\.config={SENTINEL}"),
    ] {
        let err = t.template_raw(&strings(&["-f", "helm/examples/kafka.yaml", "--set-string", &set])).unwrap_err();
        assert!(err.contains("secrets.kafka.optionFiles") && !err.contains(SENTINEL), "{err}");
    }
    for key in ["token", "password"] {
        let set = format!("config.source.{key}={SENTINEL}");
        let err = t.template_raw(&strings(&["-f", "helm/examples/nats.yaml", "--set-string", &set])).unwrap_err();
        assert!(err.contains(&format!("secrets.nats.{key}")) && !err.contains(SENTINEL), "{err}");
    }
    for (name, args) in support::cases() {
        let docs = t.render(&args, dir.path());
        let text = config_toml(&docs);
        let config = check_config(&name, &text, dir.path());
        assert!(!text.contains(SENTINEL));
        assert_no_inline_secrets(&name, &config);
        let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().into_iter().chain(pod["initContainers"].as_array()).flatten() {
            assert_secret_env(&name, c);
        }
        // Every secret file the config names lies in a mount of a Secret volume.
        let secret_vols: BTreeSet<&str> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["secret"].is_object())
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        let secret_dirs: Vec<&str> = worker(&docs)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| secret_vols.contains(m["name"].as_str().unwrap()))
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        for word in text.split('"').filter(|w| w.starts_with("/etc/scorestream/secrets/")) {
            assert!(secret_dirs.iter().any(|d| word.starts_with(&format!("{d}/"))), "{name}: {word} not mounted");
        }
    }
    // NATS token: from the Secret into env overrides of each nats section, never into the file.
    let token =
        ["--set", "secrets.nats.credentials.existingSecret=", "--set", "secrets.nats.token.existingSecret=nats-token"];
    let docs = t.render(&strings(&[&["-f", "helm/examples/nats.yaml"][..], &token].concat()), dir.path());
    let env: Vec<&Value> = worker(&docs)["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().ends_with("__TOKEN"))
        .collect();
    let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["SCORESTREAM__SOURCE__TOKEN", "SCORESTREAM__SINK__TOKEN", "SCORESTREAM__DEAD_LETTER__TOKEN"]);
    assert!(env.iter().all(|e| e["valueFrom"]["secretKeyRef"]["name"] == "nats-token"));
    let cfg: toml::Table = config_toml(&docs).parse().unwrap();
    assert!(["source", "sink", "dead_letter"].iter().all(|s| cfg[*s].get("token").is_none()), "{cfg}");
    let both = ["-f", "helm/examples/nats.yaml", "--set", "secrets.nats.token.existingSecret=nats-token"];
    assert!(t.template_raw(&strings(&both)).unwrap_err().contains("use one of credentials, token or password"));
    let docs = t.render(&strings(&["-f", "helm/examples/kafka.yaml"]), dir.path());
    let text = config_toml(&docs);
    assert!(text.contains(r#""sasl.password" = "/etc/scorestream/secrets/kafka/password""#), "{text}");
    assert!(text.contains(r#""ssl.ca.location" = "/etc/scorestream/secrets/kafka-tls/ca.crt""#), "{text}");
}

fn assert_no_inline_secrets(name: &str, config: &Config) {
    let secret_option =
        |k: &String| ["password", "secret", "token", "oauthbearer.config", "key.pem"].iter().any(|s| k.contains(s));
    match &config.source {
        SourceConfig::Kafka(k) => assert!(!k.options.0.keys().any(secret_option), "{name}: {:?}", k.options),
        SourceConfig::Nats(n) => assert!(n.token.is_none() && n.password.is_none(), "{name}"),
        SourceConfig::File(_) => {}
    }
    for sink in [&config.sink, &config.dead_letter] {
        match sink {
            SinkConfig::Kafka(k) => assert!(!k.options.0.keys().any(secret_option), "{name}: {:?}", k.options),
            SinkConfig::Nats(n) => assert!(n.token.is_none() && n.password.is_none(), "{name}"),
            SinkConfig::File(_) => {}
        }
    }
}

#[test]
fn keda_never_scales_past_the_partitions() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kafka = ["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/keda-kafka.yaml"];
    let docs = t.render(&strings(&[&kafka[..], &["--set", "keda.partitions=3"]].concat()), dir.path());
    let so = one(&docs, "ScaledObject");
    assert_eq!(so["spec"]["maxReplicaCount"], 3);
    assert!(one(&docs, "Deployment")["spec"].get("replicas").is_none(), "KEDA owns the replica count");
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    assert_eq!(trigger["metadata"]["consumerGroup"], "scorestream-reward");
    assert_eq!(trigger["metadata"]["topic"], "chat.conversations");
    assert_eq!(trigger["metadata"]["allowIdleConsumers"], "false");
    assert_eq!(trigger["authenticationRef"]["name"], "rel-scorestream-kafka", "the chart's own TriggerAuthentication");
    // Brokers given as a list (the worker takes both forms) reach the scaler comma separated.
    let listed = ["--set-json", r#"config.source.brokers=["k0:9093","k1:9093"]"#];
    let docs = t.render(&strings(&[&kafka[..], &listed].concat()), dir.path());
    check_config("listed brokers", &config_toml(&docs), dir.path());
    assert_eq!(one(&docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["bootstrapServers"], "k0:9093,k1:9093");
    let err = t.template_raw(&strings(&[&kafka[..], &["--set", "keda.partitions=null"]].concat())).unwrap_err();
    assert!(err.contains("keda.partitions is required"), "{err}");
    let docs = t.render(&strings(&["-f", "helm/examples/nats.yaml", "-f", "helm/examples/keda-nats.yaml"]), dir.path());
    let trigger = &one(&docs, "ScaledObject")["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "nats-jetstream");
    assert_eq!(trigger["metadata"]["consumer"], "scorestream-reward");
    assert_eq!(trigger["metadata"]["stream"], "CONVERSATIONS");
    assert!(trigger["metadata"]["account"].as_str().unwrap().starts_with('A'), "the account of nats.creds, not $G");
    let global = ["-f", "helm/examples/nats.yaml", "-f", "helm/examples/keda-nats.yaml", "--set", "keda.nats.account=$G"];
    let err = t.template_raw(&strings(&global)).unwrap_err();
    assert!(err.contains("must be the account of the NATS credentials"), "{err}");
}

#[test]
fn model_download_uses_the_token_secret_and_skips_present_files() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docs = t.render(&strings(&["-f", "helm/examples/nats.yaml"]), dir.path());
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let token = init["env"].as_array().unwrap().iter().find(|e| e["name"] == "HF_TOKEN").expect("HF_TOKEN");
    assert_eq!(token["valueFrom"]["secretKeyRef"]["name"], "hf-token");
    assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);
    // The script the init container runs, with a complete download already in place: no network.
    let script_text =
        find_kind(&docs, "ConfigMap").iter().find_map(|c| c["data"]["download_model.py"].as_str()).unwrap();
    let script = dir.path().join("download_model.py");
    std::fs::write(&script, script_text).unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    let env_of = |n: &str| {
        init["env"].as_array().unwrap().iter().find(|e| e["name"] == n).unwrap()["value"].as_str().unwrap().to_owned()
    };
    let (repo, revision, patterns) = (env_of("HF_REPO"), env_of("HF_REVISION"), env_of("HF_ALLOW_PATTERNS"));
    let marker = format!(r#"{{"repo": "{repo}", "revision": "{revision}", "allow_patterns": {patterns}}}"#);
    std::fs::write(model_dir.join(".scorestream-download.json"), marker).unwrap();
    let env = [
        ("HF_REPO", repo.as_str()),
        ("HF_REVISION", revision.as_str()),
        ("HF_ALLOW_PATTERNS", patterns.as_str()),
        ("MODEL_DIR", model_dir.to_str().unwrap()),
        ("PIP_NO_INDEX", "1"),
    ];
    let out = support::run(&t.python, &[script.to_string_lossy().into_owned()], &env);
    assert!(out.ok && out.stdout.contains("nothing to download"), "{}{}", out.stdout, out.stderr);
}

/// Names and label sets the worker exports: its registry's exposition with every labelled
/// family touched, so each appears; and, once the binary has `run`, a scrape of a worker running
/// configs/file.toml, which must serve every family of that registry (but the Kafka-only lag).
fn exported() -> &'static BTreeMap<String, support::Family> {
    static EXPORTED: std::sync::OnceLock<BTreeMap<String, support::Family>> = std::sync::OnceLock::new();
    EXPORTED.get_or_init(exported_uncached)
}

fn exported_uncached() -> BTreeMap<String, support::Family> {
    let m = scorestream::metrics::Metrics::new().expect("metrics registry");
    m.events_consumed.with_label_values(&["kafka"]).inc();
    m.consumer_lag.with_label_values(&["t", "0"]).set(1);
    m.reward.with_label_values(&["reward"]).observe(0.0);
    m.set_model_info("m", "bf16", &["cuda:0".to_owned()]);
    m.update_stage_busy(&[1.5], &["cuda:0".to_owned()]);
    let mut families = support::families(&m.render().expect("exposition"));
    for name in scorestream::metrics::NAMES {
        families.entry(name.to_owned()).or_default();
    }
    let config = support::repo().join("configs/file.toml");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_scorestream"));
    if support::run(bin, &strings(&["run", "--help"]), &[]).ok {
        let dir = tempfile::tempdir().unwrap();
        let scraped = support::families(&support::scrape_worker(&config, dir.path()));
        for name in families.keys().filter(|n| *n != "scorestream_consumer_lag") {
            assert!(scraped.contains_key(name), "a running worker does not serve {name}");
        }
        for (name, family) in scraped {
            families.entry(name).or_default().labels.extend(family.labels);
        }
    } else {
        eprintln!("no `scorestream run` yet: metric names checked against the registry, not a running worker");
    }
    families
}

/// Check one PromQL expression against the exported families; returns how many metrics it names.
fn check_expr(where_: &str, expr: &str, families: &BTreeMap<String, support::Family>) -> usize {
    // Labels Prometheus adds to every target, and the histogram bucket label.
    let target_labels = ["namespace", "job", "pod", "instance", "service", "container", "endpoint", "le"];
    let reads = support::parse_promql(expr).unwrap_or_else(|e| panic!("{where_}: invalid PromQL {expr}: {e}"));
    let family_of = |metric: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                metric.strip_suffix(suf).filter(|b| families.get(*b).is_some_and(|f| f.kind == "histogram"))
            })
            .unwrap_or(metric)
            .to_owned();
        let family = families.get(&base).unwrap_or_else(|| panic!("{where_}: {metric} is not exported (in: {expr})"));
        (base, family)
    };
    for s in &reads.selectors {
        let (base, family) = family_of(&s.metric);
        for l in s.labels.iter().filter(|l| !target_labels.contains(&l.as_str())) {
            assert!(family.kind.is_empty() || family.labels.contains(l), "{where_}: {base} has no label {l} ({expr})");
        }
    }
    // Every label grouped or matched on exists on a metric below (a typo yields one empty series).
    for (labels, metrics) in &reads.groupings {
        for l in labels.iter().filter(|l| !target_labels.contains(&l.as_str())) {
            let found = metrics.iter().map(|m| family_of(m).1).any(|f| f.kind.is_empty() || f.labels.contains(l));
            assert!(found, "{where_}: no metric of {metrics:?} has the label {l} ({expr})");
        }
    }
    reads.selectors.len()
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let families = exported();
    let docs =
        t.render(&strings(&["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/monitoring.yaml"]), dir.path());
    let cm = find_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("dashboard");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    let json = cm["data"].as_object().unwrap().values().next().unwrap().as_str().unwrap();
    let dash: Value = serde_json::from_str(json).expect("dashboard JSON parses");
    let mut exprs = 0;
    let mut titles = Vec::new();
    for p in dash["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap();
        titles.push(title.to_owned());
        for target in p["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(check_expr(title, expr, families) > 0, "{title}: {expr} names no scorestream metric");
            exprs += 1;
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        // Grafana's label_values(SELECTOR, LABEL): the selector is PromQL, the label one of its metric's.
        let query = v["query"]["query"].as_str().unwrap();
        let args = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).expect("label_values(..)");
        let (selector, label) = args.rsplit_once(',').expect("label_values(SELECTOR, LABEL)");
        let grouped = format!("count by ({}) ({selector})", label.trim());
        check_expr(&format!("variable {}", v["name"]), &grouped, families);
    }
    for wanted in [
        "Events / s",
        "Tokens / s",
        "Event latency",
        "Batch size",
        "Batch tokens",
        "Consumer lag per partition",
        "Dead letters by reason",
        "Stage utilisation",
        "Reward distribution",
    ] {
        assert!(titles.iter().any(|t| t.starts_with(wanted)), "no panel {wanted:?} in {titles:?}");
    }
    assert!(exprs >= 15, "{exprs} queries");
    let rules = one(&docs, "PrometheusRule");
    // Series from Prometheus itself and kube-state-metrics, beside the worker's.
    let mut families_ext: BTreeMap<String, support::Family> =
        families.iter().map(|(k, f)| (k.clone(), support::Family { kind: f.kind.clone(), labels: f.labels.clone() })).collect();
    for external in ["up", "kube_deployment_status_replicas_available"] {
        families_ext.insert(external.to_owned(), support::Family::default());
    }
    let mut alerts = Vec::new();
    for r in rules["spec"]["groups"][0]["rules"].as_array().unwrap() {
        let alert = r["alert"].as_str().unwrap();
        assert!(check_expr(alert, r["expr"].as_str().unwrap(), &families_ext) > 0, "{alert} names no metric");
        alerts.push(alert.to_owned());
    }
    assert_eq!(
        alerts,
        [
            "ScorestreamNoWorkerReady",
            "ScorestreamNothingScored",
            "ScorestreamDeadLetterRate",
            "ScorestreamLagGrowing",
            "ScorestreamLatencyHigh",
            "ScorestreamRewardDrop",
            "ScorestreamRewardDrop",
            "ScorestreamRewardDrop"
        ]
    );
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], one(&docs, "Service")["spec"]["ports"][0]["name"]);
}

#[test]
fn promql_reader_finds_metrics_labels_and_histogram_series() {
    let expr = r#"sum by (le) (rate(scorestream_reward_bucket{job=~"a|scorestream_x", attribute="reward"}[$__rate_interval]))
        / on() scorestream_inflight_events"#;
    let reads = support::parse_promql(expr).unwrap();
    let names: Vec<(&str, Vec<&str>)> =
        reads.selectors.iter().map(|s| (s.metric.as_str(), s.labels.iter().map(String::as_str).collect())).collect();
    assert_eq!(
        names,
        [("scorestream_reward_bucket", vec!["job", "attribute"]), ("scorestream_inflight_events", vec![])]
    );
    let families = exported();
    assert_eq!(families["scorestream_reward"].kind, "histogram");
    assert!(families["scorestream_consumer_lag"].labels.contains("partition"));
    assert_eq!(check_expr("t", "rate(scorestream_reward_count{attribute=\"x\"}[1m])", families), 1);
    for (bad, why) in [
        ("scorestream_reward_sum{reason=\"x\"}", "a label the metric does not have"),
        ("scorestream_events_total", "an unknown metric"),
        ("sum by (reasons) (scorestream_events_failed_total)", "grouping by a label no metric has"),
        ("sum(rate(scorestream_events_scored_total[5m])", "a syntax error"),
    ] {
        let result = std::panic::catch_unwind(|| check_expr("t", bad, exported()));
        assert!(result.is_err(), "{why} is refused: {bad}");
    }
}

#[test]
fn config_values_survive_the_toml_rendering() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tricky = "grp \"quoted\" back\\slash\ttab é ☃ <&>";
    let values = dir.path().join("tricky.yaml");
    let yaml = format!(
        "config:\n  model:\n    attribute_weights: [1, 0.5, 0.0000001, -2]\n    max_tokens: 131072\n  \
         batch:\n    max_batch_tokens: 131072\n  metrics:\n    reward_buckets: [-1, 0, 0.5, 1.5e3]\n  \
         source:\n    type: kafka\n    brokers: a:9092\n    topics: [t1, \"t.2\"]\n    group_id: {}\n    \
         options: {{\"fetch.max.bytes\": \"1048576\", \"client.id\": \"x y\"}}\n",
        serde_json::to_string(tricky).unwrap()
    );
    std::fs::write(&values, yaml).unwrap();
    let docs = t.render(&strings(&["-f", values.to_str().unwrap()]), dir.path());
    let config = check_config("tricky", &config_toml(&docs), dir.path());
    assert_eq!(config.model.attribute_weights, Some(vec![1.0, 0.5, 1e-7, -2.0]));
    assert_eq!(config.model.max_tokens, 131_072);
    assert_eq!(config.batch.max_batch_tokens, 131_072);
    assert_eq!(config.metrics.reward_buckets, [-1.0, 0.0, 0.5, 1500.0]);
    let SourceConfig::Kafka(k) = &config.source else { panic!("kafka source expected") };
    assert_eq!(k.group_id, tricky);
    assert_eq!(k.topics, ["t1", "t.2"]);
    assert_eq!(k.options.0["fetch.max.bytes"], "1048576");
    assert_eq!(k.options.0["client.id"], "x y");
}

/// `config.sinks` and `config.route` render as `[sinks.<name>]` tables and `[[route]]` rules
/// that the worker accepts; a named sink gets the same secret files as the fixed ones.
#[test]
fn named_sinks_and_routes_render() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, args) = support::cases().into_iter().find(|(n, _)| n == "nats").expect("helm/examples/nats.yaml");
    let text = config_toml(&t.render(&args, dir.path()));
    assert!(text.contains("[sinks.review]") && text.contains("[[route]]"), "{text}");
    let config = check_config("routes", &text, dir.path());
    assert_eq!(config.route.len(), 1);
    assert_eq!(config.route[0].when, "reward < 0.2");
    assert_eq!(config.route[0].to, "review");
    let (Some(SinkConfig::Nats(review)), SinkConfig::Nats(sink)) = (config.sinks.get("review"), &config.sink) else {
        panic!("a nats review sink expected: {text}")
    };
    assert_eq!(review.subject, "chat.review");
    assert_eq!(review.credentials_file, sink.credentials_file);
    assert!(review.credentials_file.is_some());
}
