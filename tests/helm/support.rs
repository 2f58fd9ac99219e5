//! Helpers of the chart tests: find the tools, render the chart, read PromQL and the exposition.
//!
//! Tools come from `scripts/install_helm.sh` (`.tools/bin/`) or `PATH`. Without them a test is
//! skipped with a message, except when `CI` is set: there a missing tool is a failure
//! (`tests/missing_tool`). Shared by `helm.rs` and `helm_ops.rs`, each using part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use promql_parser::parser::{Expr, LabelModifier, VectorSelector};
use serde_json::Value;

pub const CHART: &str = "helm/scorestream";
pub const EXAMPLES: &str = "helm/examples";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Tools {
    pub helm: PathBuf,
    pub validate: PathBuf,
    /// A Python with PyYAML and jsonschema (kubernetes-validate's own environment).
    pub python: PathBuf,
}

fn find(name: &str, local: &Path) -> Option<PathBuf> {
    if local.is_file() {
        return Some(local.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The tools, or `None` (after saying why) when they are missing outside CI.
pub fn tools() -> Option<Tools> {
    let dir = repo().join(".tools");
    let helm = find("helm", &dir.join("bin/helm"));
    let validate = find("kubernetes-validate", &dir.join("bin/kubernetes-validate"));
    let venv_python = dir.join("venv/bin/python");
    let python = if venv_python.is_file() { Some(venv_python) } else { find("python3", Path::new("")) };
    match (helm, validate, python) {
        (Some(helm), Some(validate), Some(python)) => Some(Tools { helm, validate, python }),
        _ => {
            crate::missing_tool::skip_or_fail("helm, kubernetes-validate or python3 not found", "run scripts/install_helm.sh");
            None
        }
    }
}

/// Example files meant to be layered on another one (`-f base -f overlay`), with that base.
pub const OVERLAYS: [(&str, &str); 3] = [("keda-kafka", "kafka"), ("keda-nats", "nats"), ("monitoring", "kafka")];

/// Values files the chart is tested with: none (the defaults), then each example, an overlay
/// layered on its base. Returns (name, helm arguments).
pub fn cases() -> Vec<(String, Vec<String>)> {
    let dir = repo().join(EXAMPLES);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("helm/examples exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let file = |n: &str| dir.join(format!("{n}.yaml")).to_string_lossy().into_owned();
    let mut cases = vec![("defaults".to_owned(), vec![])];
    for name in names {
        let mut args = Vec::new();
        if let Some((_, base)) = OVERLAYS.iter().find(|(o, _)| *o == name) {
            args.extend(["-f".to_owned(), file(base)]);
        }
        args.extend(["-f".to_owned(), file(&name)]);
        cases.push((name, args));
    }
    cases
}

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(program: &Path, args: &[String], env: &[(&str, &str)]) -> Output {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

impl Tools {
    /// `helm template` with `args`; the raw output (Err carries helm's error).
    pub fn template_raw(&self, args: &[String]) -> Result<String, String> {
        let mut all = strings(&["template", "rel", CHART, "--namespace", "scoring"]);
        all.extend_from_slice(args);
        let out = run(&self.helm, &all, &[]);
        if out.ok {
            Ok(out.stdout)
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    }

    /// Render, check the custom resources against tests/helm/schemas, return every manifest.
    pub fn render(&self, args: &[String], dir: &Path) -> Vec<Value> {
        let yaml = self.template_raw(args).unwrap_or_else(|e| panic!("helm template {args:?} failed: {e}"));
        let file = dir.join("rendered.yaml");
        std::fs::write(&file, yaml).unwrap();
        let script = repo().join("tests/helm/manifests.py");
        let out = run(&self.python, &[script.to_string_lossy().into_owned(), file.to_string_lossy().into_owned()], &[]);
        assert!(out.ok, "custom resources of {args:?} do not validate:\n{}", out.stderr);
        match serde_json::from_str(&out.stdout).expect("manifests.py prints JSON") {
            Value::Array(docs) => docs,
            other => panic!("expected a list of manifests, got {other}"),
        }
    }
}

pub fn find_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// The worker container of the Deployment.
pub fn worker(docs: &[Value]) -> &Value {
    let containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    containers.iter().find(|c| c["name"] == "worker").expect("a container named worker")
}

/// The rendered worker config (ConfigMap key config.toml).
pub fn config_toml(docs: &[Value]) -> String {
    let cms = find_kind(docs, "ConfigMap");
    let cm = cms.iter().find(|c| c["data"].get("config.toml").is_some()).expect("a ConfigMap with config.toml");
    cm["data"]["config.toml"].as_str().unwrap().to_owned()
}

/// A metric selector in PromQL: the metric name and the label names it matches on.
#[derive(Debug)]
pub struct Selector {
    pub metric: String,
    pub labels: Vec<String>,
}

/// What a PromQL expression reads: its selectors, and each `by (...)` / `on (...)` label list
/// with the metrics below it (the labels must exist on one of them).
#[derive(Debug, Default)]
pub struct Reads {
    pub selectors: Vec<Selector>,
    pub groupings: Vec<(Vec<String>, Vec<String>)>,
}

/// Parse a PromQL expression (Grafana's `$__rate_interval`-style ranges allowed).
pub fn parse_promql(expr: &str) -> Result<Reads, String> {
    let text = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h");
    let ast = promql_parser::parser::parse(&text)?;
    let mut reads = Reads::default();
    walk(&ast, &mut reads);
    Ok(reads)
}

fn selector(vs: &VectorSelector) -> Selector {
    let matchers = &vs.matchers.matchers;
    let metric = vs.name.clone().or_else(|| matchers.iter().find(|m| m.name == "__name__").map(|m| m.value.clone()));
    let labels = matchers.iter().filter(|m| m.name != "__name__").map(|m| m.name.clone()).collect();
    Selector { metric: metric.unwrap_or_default(), labels }
}

fn grouped(labels: Option<&LabelModifier>, below: &Expr, reads: &mut Reads) {
    let mut inner = Reads::default();
    walk(below, &mut inner);
    if let Some(m) = labels {
        let metrics = inner.selectors.iter().map(|s| s.metric.clone()).collect();
        reads.groupings.push((m.labels().labels.clone(), metrics));
    }
    reads.selectors.extend(inner.selectors);
    reads.groupings.extend(inner.groupings);
}

fn walk(expr: &Expr, reads: &mut Reads) {
    match expr {
        Expr::Aggregate(a) => {
            grouped(a.modifier.as_ref(), &a.expr, reads);
            if let Some(p) = &a.param {
                walk(p, reads);
            }
        }
        Expr::Binary(b) => {
            let on = b.modifier.as_ref().and_then(|m| m.matching.as_ref());
            grouped(on, &b.lhs, reads);
            grouped(on, &b.rhs, reads);
        }
        Expr::Unary(u) => walk(&u.expr, reads),
        Expr::Paren(p) => walk(&p.expr, reads),
        Expr::Subquery(s) => walk(&s.expr, reads),
        Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, reads)),
        Expr::VectorSelector(vs) => reads.selectors.push(selector(vs)),
        Expr::MatrixSelector(ms) => reads.selectors.push(selector(&ms.vs)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// A metric family of the exposition: its type and label names.
#[derive(Debug, Default)]
pub struct Family {
    pub kind: String,
    pub labels: BTreeSet<String>,
}

/// Families of a Prometheus text exposition, by name.
pub fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            out.entry(name.to_owned()).or_default().kind = kind.to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.split_whitespace().next().unwrap_or_default();
            let name = series.split('{').next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| out.get(*b).is_some_and(|f| f.kind == "histogram")))
                .unwrap_or(name);
            let reads = parse_promql(&format!("{base}{}", &series[name.len()..])).unwrap_or_default();
            if let (Some(f), Some(sel)) = (out.get_mut(base), reads.selectors.first()) {
                f.labels.extend(sel.labels.iter().filter(|l| *l != "le").cloned());
            }
        }
    }
    out
}

/// `GET path` on 127.0.0.1:port; the status code and body, or None if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Run `scorestream run --config CONFIG` reading one event from stdin, wait until it has scored
/// it, and return its `/metrics` text. The worker is stopped (stdin closed, then killed) after.
pub fn scrape_worker(config: &Path, dir: &Path) -> String {
    use std::io::Write;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("worker.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("SCORESTREAM__HTTP__LISTEN", &listen)
        .env("SCORESTREAM__SOURCE__PATH", "-")
        .env("SCORESTREAM__SINK__PATH", dir.join("scored.jsonl"))
        .env("SCORESTREAM__DEAD_LETTER__PATH", dir.join("dead.jsonl"))
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start scorestream run");
    let mut stdin = child.stdin.take().unwrap();
    let event =
        r#"{"id":"helm-1","messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}"#;
    writeln!(stdin, "{event}").unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let text = loop {
        let scored = http_get(port, "/metrics").filter(|(status, body)| {
            *status == 200 && body.lines().any(|l| l.starts_with("scorestream_events_scored_total{delivery=\"first\"} 1"))
        });
        if let Some((_, body)) = scored {
            break Some(body);
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    text.unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
        panic!("the worker never reported a scored event on {listen}/metrics; its log:\n{log}")
    })
}
