//! The chart's operations side: alerts (a worker-down alert, grouping by namespace, runbook
//! links, per-attribute reward thresholds, a latency threshold within the histogram), KEDA's
//! Kafka authentication from the chart's Secrets, the escape hatches (extra env, volumes, mounts,
//! init containers, download env and disk), a download that installs nothing, JSON logs, and the
//! HTTP score API (its limits, a token from a Secret file, its own port on the Service).
//!
//! Needs helm and kubernetes-validate (`scripts/install_helm.sh`); skipped without them unless
//! `CI` is set, where their absence fails the tests.

// Shared with tests/helm.rs, which uses the rest of it.
#[allow(dead_code)]
mod missing_tool;
#[path = "helm/support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use support::{config_toml, find_kind, one, strings, worker, Tools};

fn tools() -> Option<Tools> {
    support::tools()
}

#[test]
fn worker_logs_json_by_default() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let args = |docs: &[Value]| worker(docs)["args"].as_array().unwrap()[..3].to_vec();
    let docs = t.render(&[], dir.path());
    assert_eq!(args(&docs), ["--log-format", "json", "run"]);
    let docs = t.render(&strings(&["--set", "logFormat=text"]), dir.path());
    assert_eq!(args(&docs), ["--log-format", "text", "run"]);
    assert!(t.template_raw(&strings(&["--set", "logFormat=xml"])).is_err(), "the schema knows the formats");
}

#[test]
fn latency_alert_threshold_stays_below_the_top_bucket() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let top = *scorestream::metrics::LATENCY_BUCKETS.last().unwrap();
    let helpers = std::fs::read_to_string(support::repo().join("helm/scorestream/templates/_helpers.tpl")).unwrap();
    let define = format!(r#"{{{{- define "scorestream.latencyTopBucket" -}}}}{top}{{{{- end -}}}}"#);
    assert!(helpers.contains(&define), "the chart's top latency bucket is not {top}");
    let monitoring = ["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/monitoring.yaml"];
    let with = |p99: &str| {
        let set = format!("prometheusRule.latency.p99Seconds={p99}");
        t.template_raw(&strings(&[&monitoring[..], &["--set", &set]].concat()))
    };
    let docs = t.render(&strings(&monitoring), dir.path());
    let rules = one(&docs, "PrometheusRule")["spec"]["groups"].as_array().unwrap().clone();
    let latency = rules.iter().flat_map(|g| g["rules"].as_array().unwrap()).find(|r| r["alert"] == "ScorestreamLatencyHigh");
    let expr = latency.expect("a latency alert")["expr"].as_str().unwrap().to_owned();
    let threshold: f64 = expr.rsplit('>').next().unwrap().trim().parse().unwrap();
    assert!(threshold < top, "default threshold {threshold}");
    assert!(with("3600").is_ok());
    for beyond in [top.to_string(), "86400".to_owned()] {
        let err = with(&beyond).unwrap_err();
        assert!(err.contains("must be below the top latency bucket"), "{err}");
    }
}

/// The alert rules of a render, flattened over their groups.
fn alert_rules(docs: &[Value]) -> Vec<Value> {
    let groups = one(docs, "PrometheusRule")["spec"]["groups"].as_array().unwrap().clone();
    groups.iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect()
}

#[test]
fn alerts_keep_the_namespace_and_link_their_runbook_section() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let runbook = std::fs::read_to_string(support::repo().join("RUNBOOK.md")).unwrap();
    // GitHub's anchors of `## Heading` lines: lower case (the headings are alert names).
    let anchors: BTreeSet<String> =
        runbook.lines().filter_map(|l| l.strip_prefix("## ")).map(|h| h.trim().to_lowercase()).collect();
    let monitoring = ["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/monitoring.yaml"];
    for (args, base) in [
        (&monitoring[..2], "https://github.com/scorestream/scorestream/blob/main/RUNBOOK.md"),
        (&monitoring[..], "https://wiki.example.com/ml-platform/scorestream-runbook"),
    ] {
        let enabled = [args, &["--set", "prometheusRule.enabled=true"]].concat();
        let docs = t.render(&strings(&enabled), dir.path());
        for r in alert_rules(&docs) {
            let alert = r["alert"].as_str().unwrap();
            let url = r["annotations"]["runbook_url"].as_str().unwrap_or_else(|| panic!("{alert}: no runbook_url"));
            assert_eq!(url, format!("{base}#{}", alert.to_lowercase()), "{alert}");
            assert!(anchors.contains(&alert.to_lowercase()), "RUNBOOK.md has no section {alert}");
            // Every aggregation and vector match keeps `namespace`: one alert per namespace.
            let expr = r["expr"].as_str().unwrap();
            let reads = support::parse_promql(expr).unwrap();
            assert!(!reads.groupings.is_empty(), "{alert}: no aggregation");
            for (labels, _) in &reads.groupings {
                assert!(labels.iter().any(|l| l == "namespace"), "{alert}: groups by {labels:?} without namespace: {expr}");
            }
        }
    }
}

#[test]
fn no_worker_alert_fires_on_absent_or_unready_workers() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docs = t.render(&strings(&["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/monitoring.yaml"]), dir.path());
    let rules = alert_rules(&docs);
    let rule = rules.iter().find(|r| r["alert"] == "ScorestreamNoWorkerReady").expect("ScorestreamNoWorkerReady");
    assert_eq!(rule["labels"]["severity"], "critical");
    let expr = rule["expr"].as_str().unwrap();
    let ast = promql_parser::parser::parse(expr).unwrap_or_else(|e| panic!("{e}: {expr}"));
    let text = ast.prettify();
    // absent() of a healthy target: fires with every pod gone, not only with pods failing.
    assert!(text.contains(r#"absent(up{job="rel-scorestream",namespace="scoring"} == 1)"#), "{text}");
    assert!(
        expr.contains(r#"kube_deployment_status_replicas_available{namespace="scoring", deployment="rel-scorestream"}"#)
            && expr.trim_end().ends_with("== 0"),
        "{expr}"
    );
}

#[test]
fn reward_drop_thresholds_are_per_attribute() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docs = t.render(&strings(&["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/monitoring.yaml"]), dir.path());
    let mut found = BTreeMap::new();
    for r in alert_rules(&docs).iter().filter(|r| r["alert"] == "ScorestreamRewardDrop") {
        let expr = r["expr"].as_str().unwrap();
        let reads = support::parse_promql(expr).unwrap();
        assert!(reads.selectors.iter().all(|s| s.labels.contains(&"attribute".to_owned())), "{expr}");
        let attribute = expr.split("attribute=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
        assert!(expr.matches(&format!("attribute=\"{attribute}\"")).count() == reads.selectors.len(), "{expr}");
        let amount = expr.split("- ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
        found.insert(attribute, amount);
    }
    let want: BTreeMap<String, String> =
        [("correctness", "0.4"), ("helpfulness", "0.25"), ("reward", "0.3")].map(|(a, v)| (a.into(), v.into())).into();
    assert_eq!(found, want);
    // The defaults watch the scalar reward alone.
    let docs = t.render(&strings(&["--set", "prometheusRule.enabled=true"]), dir.path());
    let n = alert_rules(&docs).iter().filter(|r| r["alert"] == "ScorestreamRewardDrop").count();
    assert_eq!(n, 1);
}

/// KEDA's Kafka credentials follow the worker's: SASL mechanism and user from config.source,
/// password and TLS material from the same Secrets; the refs name keys the worker mounts.
#[test]
fn keda_kafka_authentication_comes_from_the_chart_secrets() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kafka = ["-f", "helm/examples/kafka.yaml", "-f", "helm/examples/keda-kafka.yaml"];
    let docs = t.render(&strings(&kafka), dir.path());
    let auth = one(&docs, "TriggerAuthentication");
    let refs: BTreeMap<&str, (&str, &str)> = auth["spec"]["secretTargetRef"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["parameter"].as_str().unwrap(), (r["name"].as_str().unwrap(), r["key"].as_str().unwrap())))
        .collect();
    assert_eq!(refs["password"], ("kafka-scorestream", "password"));
    assert_eq!(refs["ca"], ("kafka-ca", "ca.crt"));
    let own = find_kind(&docs, "Secret");
    assert_eq!(own.len(), 1);
    let data = &own[0]["stringData"];
    assert_eq!((data["sasl"].as_str(), data["username"].as_str(), data["tls"].as_str()), (Some("scram_sha512"), Some("scorestream"), Some("enable")));
    for p in ["sasl", "username", "tls"] {
        assert_eq!(refs[p], (own[0]["metadata"]["name"].as_str().unwrap(), p));
    }
    let so = one(&docs, "ScaledObject");
    assert_eq!(so["spec"]["triggers"][0]["authenticationRef"]["name"], auth["metadata"]["name"]);
    // A TriggerAuthentication of one's own replaces the chart's.
    let docs = t.render(&strings(&[&kafka[..], &["--set", "keda.kafka.authenticationRef=mine"]].concat()), dir.path());
    assert!(find_kind(&docs, "TriggerAuthentication").is_empty() && find_kind(&docs, "Secret").is_empty());
    assert_eq!(one(&docs, "ScaledObject")["spec"]["triggers"][0]["authenticationRef"]["name"], "mine");
    // PLAINTEXT brokers: no authentication at all.
    let plain = ["-f", "helm/examples/keda-kafka.yaml"];
    let docs = t.render(&strings(&plain), dir.path());
    assert!(find_kind(&docs, "TriggerAuthentication").is_empty());
    assert!(one(&docs, "ScaledObject")["spec"]["triggers"][0].get("authenticationRef").is_none());
    // A mechanism KEDA's scaler is not given by the chart is refused, naming the way out.
    let gssapi = [&kafka[..], &["--set", "config.source.options.sasl\\.mechanism=GSSAPI"]].concat();
    let err = t.template_raw(&strings(&gssapi)).unwrap_err();
    assert!(err.contains("keda.kafka.authenticationRef"), "{err}");
}

/// kubernetes-validate on one render (the manifests of `args`).
fn validate(t: &Tools, name: &str, args: &[String], dir: &std::path::Path) -> Vec<Value> {
    let docs = t.render(args, dir);
    let file = dir.join("rendered.yaml");
    let out = support::run(&t.validate, &strings(&["--strict", "-k", "1.30.0", "--quiet", file.to_str().unwrap()]), &[]);
    assert!(out.ok && !out.stdout.contains("ERROR"), "{name}: kubernetes-validate failed:\n{}{}", out.stdout, out.stderr);
    docs
}

#[test]
fn escape_hatches_reach_the_pod_and_validate() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("extras.yaml");
    std::fs::write(
        &values,
        r#"
extraEnv:
  - {name: HTTPS_PROXY, value: "http://proxy.internal:3128"}
  - name: FROM_SECRET
    valueFrom: {secretKeyRef: {name: s, key: k}}
extraVolumes:
  - name: ca-bundle
    configMap: {name: corporate-ca}
extraVolumeMounts:
  - {name: ca-bundle, mountPath: /etc/ssl/corporate, readOnly: true}
extraInitContainers:
  - name: wait-for-broker
    image: busybox:1.36
    command: [sh, -c, "until nc -z nats.nats 4222; do sleep 2; done"]
model:
  download:
    env:
      - {name: HF_ENDPOINT, value: "https://hf-mirror.internal"}
      - {name: HTTPS_PROXY, value: "http://proxy.internal:3128"}
    pvc: {claimName: ""}
    emptyDir: {sizeLimit: 40Gi}
"#,
    )
    .unwrap();
    let args = strings(&["-f", "helm/examples/nats.yaml", "-f", values.to_str().unwrap()]);
    let docs = validate(&t, "extras", &args, dir.path());
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    let names = |list: &Value| -> Vec<String> {
        list.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_owned()).collect()
    };
    let w = worker(&docs);
    assert!(names(&w["env"]).ends_with(&["HTTPS_PROXY".to_owned(), "FROM_SECRET".to_owned()]), "{}", w["env"]);
    assert!(names(&pod["volumes"]).contains(&"ca-bundle".to_owned()));
    assert!(names(&w["volumeMounts"]).contains(&"ca-bundle".to_owned()));
    assert_eq!(names(&pod["initContainers"]), ["download-model", "wait-for-broker"], "the download runs first");
    let init = &pod["initContainers"][0];
    let env = names(&init["env"]);
    assert!(env.contains(&"HF_ENDPOINT".to_owned()) && env.contains(&"HTTPS_PROXY".to_owned()), "{env:?}");
    // The download's emptyDir is node disk: requested by the pod (worker and init container).
    assert_eq!(w["resources"]["requests"]["ephemeral-storage"], "40Gi");
    assert_eq!(init["resources"]["requests"]["ephemeral-storage"], "40Gi");
    let model_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "model").unwrap();
    assert_eq!(model_volume["emptyDir"]["sizeLimit"], "40Gi");
    // On a PVC (nats.yaml as it is) the download takes no node disk.
    let docs = validate(&t, "nats", &strings(&["-f", "helm/examples/nats.yaml"]), dir.path());
    assert!(worker(&docs)["resources"]["requests"].get("ephemeral-storage").is_none());
    // The extra init containers also run without a download.
    let docs = validate(&t, "init only", &strings(&["-f", values.to_str().unwrap(), "--set", "model.source=pvc"]), dir.path());
    assert_eq!(names(&one(&docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]), ["wait-for-broker"]);
}

#[test]
fn model_download_installs_nothing_at_run_time() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docs = t.render(&strings(&["-f", "helm/examples/nats.yaml"]), dir.path());
    let init = &one(&docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0];
    // An image built with huggingface_hub (docker/model-downloader.Dockerfile), tagged like the chart.
    let image = init["image"].as_str().unwrap();
    assert_eq!(image, "ghcr.io/scorestream/model-downloader:0.1.0");
    let dockerfile = std::fs::read_to_string(support::repo().join("docker/model-downloader.Dockerfile")).unwrap();
    assert!(dockerfile.contains("pip install") && dockerfile.contains("huggingface_hub"));
    let script_text =
        find_kind(&docs, "ConfigMap").iter().find_map(|c| c["data"]["download_model.py"].as_str()).unwrap().to_owned();
    assert!(!script_text.contains("pip") && !script_text.contains("subprocess"), "the script installs nothing");
    // Without huggingface_hub (this Python has none) and nothing downloaded yet: a clear error,
    // no install attempt.
    let script = dir.path().join("download_model.py");
    std::fs::write(&script, &script_text).unwrap();
    let has_hub = support::run(&t.python, &strings(&["-c", "import huggingface_hub"]), &[]).ok;
    if has_hub {
        eprintln!("SKIPPED the missing-module half: {} has huggingface_hub", t.python.display());
        return;
    }
    let model_dir = dir.path().join("model");
    let env = [
        ("HF_REPO", "org/model"),
        ("MODEL_DIR", model_dir.to_str().unwrap()),
    ];
    let out = support::run(&t.python, &[script.to_string_lossy().into_owned()], &env);
    assert!(!out.ok && out.stderr.contains("huggingface_hub is not installed in this image"), "{}{}", out.stdout, out.stderr);
}

/// `scoreApi` turns on `POST /v1/score` with its limits; the token comes from a Secret mounted
/// as the file `http.token_file` names (never from the ConfigMap); `scoreApi.port` serves it on
/// `http.api_listen`, a container port and a Service port of its own. Off by default.
#[test]
fn score_api_values_reach_the_config_the_pod_and_the_service() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config_of = |docs: &[Value]| {
        let text = config_toml(docs);
        let vars = [("SCORESTREAM__MODEL__DEVICES".to_owned(), "[\"cpu\"]".to_owned())];
        scorestream::config::Config::from_toml_with_env(&text, "rendered", vars).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let docs = validate(&t, "nats", &strings(&["-f", "helm/examples/nats.yaml"]), dir.path());
    let http = config_of(&docs).http;
    assert!(!http.score_api && http.api_listen.is_none() && http.token_file.is_none());
    assert_eq!(one(&docs, "Service")["spec"]["ports"].as_array().unwrap().len(), 1);

    let values = dir.path().join("api.yaml");
    std::fs::write(
        &values,
        "scoreApi:\n  enabled: true\n  maxPendingEvents: 64\n  maxBodyBytes: 1048576\n  port: 8080\n  token: {existingSecret: score-token, key: bearer}\n",
    )
    .unwrap();
    let docs = validate(&t, "score api", &strings(&["-f", "helm/examples/nats.yaml", "-f", values.to_str().unwrap()]), dir.path());
    let http = config_of(&docs).http;
    assert!(http.score_api);
    assert_eq!((http.max_pending_events, http.max_body_bytes), (64, 1_048_576));
    assert_eq!(http.api_listen, Some("0.0.0.0:8080".parse().unwrap()));
    let token_file = http.token_file.expect("http.token_file");
    let w = worker(&docs);
    let mount = w["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "score-api-token").expect("a token mount");
    assert_eq!(token_file, std::path::Path::new(mount["mountPath"].as_str().unwrap()).join("bearer"));
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "score-api-token").unwrap();
    assert_eq!(volume["secret"]["secretName"], "score-token");
    let api_port = w["ports"].as_array().unwrap().iter().find(|p| p["name"] == "api").expect("an api container port");
    assert_eq!(api_port["containerPort"], 8080);
    let service_port = one(&docs, "Service")["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "api").cloned();
    assert_eq!(service_port.expect("an api Service port")["targetPort"], "api");

    // Without a port of its own, the API shares the metrics port: nothing more is exposed.
    let docs = validate(&t, "shared port", &strings(&["-f", "helm/examples/nats.yaml", "--set", "scoreApi.enabled=true"]), dir.path());
    assert!(config_of(&docs).http.score_api && config_of(&docs).http.api_listen.is_none());
    assert_eq!(one(&docs, "Service")["spec"]["ports"].as_array().unwrap().len(), 1);
    // The same port twice is refused at render time.
    let out = support::run(
        &t.helm,
        &strings(&["template", "rel", support::CHART, "--set", "scoreApi.enabled=true", "--set", "scoreApi.port=9090"]),
        &[],
    );
    assert!(!out.ok && out.stderr.contains("scoreApi.port must differ from service.port"), "{}", out.stderr);
}
