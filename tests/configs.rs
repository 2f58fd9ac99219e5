//! The example configs parse and validate; the environment overrides any key; mistakes are
//! reported with the field that is wrong; secrets never show in a logged config.

use std::path::Path;
use std::time::Duration;

use scorestream::config::{Config, ConfigError, Delivery, SinkConfig, SourceConfig};

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    Config::from_toml_with_env(text, "test", vars)
}

#[test]
fn every_example_config_parses_and_validates() {
    let file = parse(&example("file.toml"), &[]).unwrap();
    assert!(matches!(file.source, SourceConfig::File(_)));
    assert_eq!(file.model.path, Path::new("tests/fixtures/arith"));
    assert_eq!(file.batch.max_wait, Duration::from_millis(20));

    let kafka = parse(&example("kafka.toml"), &[]).unwrap();
    let SourceConfig::Kafka(k) = &kafka.source else { panic!("kafka source expected") };
    assert_eq!(k.topics, vec!["conversations".to_owned()]);
    assert!(matches!(&kafka.sink, SinkConfig::Kafka(s) if s.delivery == Delivery::AtLeastOnce));

    let nats = parse(&example("nats.toml"), &[]).unwrap();
    let SourceConfig::Nats(n) = &nats.source else { panic!("nats source expected") };
    assert_eq!((n.subject.as_str(), n.ack_wait), ("conversations.in", Duration::from_secs(30)));

    let review = parse(&example("route-review.toml"), &[]).unwrap();
    assert!(matches!(review.sinks.get("review"), Some(SinkConfig::Nats(s)) if s.subject == "conversations.review"));
    assert_eq!(review.route.iter().map(|r| r.to.as_str()).collect::<Vec<_>>(), ["review", "review"]);
    let keep = parse(&example("route-keep-above.toml"), &[]).unwrap();
    assert!(matches!(keep.sinks.get("archive"), Some(SinkConfig::Kafka(s)) if s.topic == "candidates.archive"));
    assert_eq!(keep.route.iter().map(|r| r.to.as_str()).collect::<Vec<_>>(), ["drop", "archive"]);
}

/// A bad expression, an unknown sink, a reserved name, and exactly-once beside a named sink that
/// cannot share its transaction are refused at config check, naming the rule or the sink.
#[test]
fn bad_routes_are_refused_with_the_rule_and_the_parser_message() {
    let base = example("route-review.toml");
    let err = |text: &str| parse(text, &[]).unwrap_err().to_string();
    let bad = err(&format!("{base}\n[[route]]\nwhen = \"reward <\"\nto = \"review\"\n"));
    assert!(bad.contains("route[2].when: "), "{bad}");
    let unknown = err(&format!("{base}\n[[route]]\nwhen = \"true\"\nto = \"nowhere\"\n"));
    assert!(unknown.contains("route[2].to") && unknown.contains("nowhere"), "{unknown}");
    let reserved = err(&base.replace("[sinks.review]", "[sinks.drop]"));
    assert!(reserved.contains("sinks.drop"), "{reserved}");
    let extra = err(&format!("{base}\n[[route]]\nwhen = \"true\"\nto = \"review\"\nelse = \"x\"\n"));
    assert!(extra.contains("else"), "{extra}");
    let keep = example("route-keep-above.toml").replace(
        "topic = \"candidates.kept\"",
        "topic = \"candidates.kept\"\ndelivery = \"exactly_once\"",
    );
    // Exactly-once with named Kafka sinks on the sink's brokers: one transaction for all.
    let eos = parse(&keep, &[]).unwrap();
    assert!(matches!(eos.sinks.get("archive"), Some(SinkConfig::Kafka(_))));
    let elsewhere = err(&keep.replace("topic = \"candidates.archive\"", "topic = \"candidates.archive\"\nbrokers = \"10.0.0.9:9092\"").replace(
        "[sinks.archive]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"",
        "[sinks.archive]\ntype = \"kafka\"",
    ));
    assert!(elsewhere.contains("sinks.archive.brokers") && elsewhere.contains("[sink]'s brokers"), "{elsewhere}");
    let nats = err(&keep.replace(
        "[sinks.archive]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"candidates.archive\"",
        "[sinks.archive]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"archive\"",
    ));
    assert!(nats.contains("sinks.archive.type") && nats.contains("cannot write to a nats sink"), "{nats}");
}

#[test]
fn defaults_fill_what_is_left_out() {
    let c = parse(
        r#"
        [model]
        path = "m"
        [source]
        type = "file"
        path = "-"
        [sink]
        type = "file"
        path = "-"
        [dead_letter]
        type = "file"
        path = "dl.jsonl"
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(c.batch.max_batch_tokens, 16_384);
    assert_eq!(c.batch.max_batch_events, 256);
    assert_eq!(c.batch.max_inflight_events, 1024);
    assert_eq!(c.batch.max_payload_bytes, 1 << 20);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.http.listen.port(), 9090);
    assert_eq!(c.model.devices, vec!["cpu".to_owned()]);
}

#[test]
fn environment_overrides_any_key() {
    let c = parse(
        &example("kafka.toml"),
        &[
            ("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "32"),
            ("SCORESTREAM__BATCH__MAX_WAIT", "5ms"),
            ("SCORESTREAM__SHUTDOWN_TIMEOUT", "2m"),
            ("SCORESTREAM__SOURCE__GROUP_ID", "other"),
            ("SCORESTREAM__SOURCE__OPTIONS__SASL.PASSWORD", "hunter2"),
            ("SCORESTREAM__SINK__DELIVERY", "exactly_once"),
            ("SCORESTREAM__MODEL__DEVICES", r#"["cpu", "cpu"]"#),
        ],
    )
    .unwrap();
    assert_eq!(c.batch.max_batch_events, 32);
    assert_eq!(c.batch.max_wait, Duration::from_millis(5));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(120));
    assert_eq!(c.model.devices.len(), 2);
    let SourceConfig::Kafka(k) = &c.source else { panic!() };
    assert_eq!(k.group_id, "other");
    assert_eq!(k.options.0["sasl.password"], "hunter2");
    assert!(matches!(&c.sink, SinkConfig::Kafka(s) if s.delivery == Delivery::ExactlyOnce));
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "a secret was shown: {shown}");
}

#[test]
fn nats_secrets_are_redacted() {
    let c = parse(
        &example("nats.toml"),
        &[("SCORESTREAM__SOURCE__USER", "worker"), ("SCORESTREAM__SOURCE__PASSWORD", "pa55word")],
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(shown.contains("worker") && !shown.contains("pa55word"), "{shown}");
    // A secret that reads as a TOML number stays the same text.
    let c = parse(&example("nats.toml"), &[("SCORESTREAM__SINK__TOKEN", "123456")]).unwrap();
    let SinkConfig::Nats(n) = &c.sink else { panic!("nats sink expected") };
    assert_eq!(n.token.as_ref().map(|t| t.expose()), Some("123456"));
}

fn error_of(text: &str, vars: &[(&str, &str)]) -> String {
    parse(text, vars).unwrap_err().to_string()
}

#[test]
fn mistakes_are_reported_with_the_field() {
    let file = example("file.toml");
    let unknown = error_of(&file.replace("[batch]", "[batch]\nmax_batch_size = 3"), &[]);
    assert!(unknown.contains("unknown field `max_batch_size`"), "{unknown}");
    let unknown_source = error_of(&example("nats.toml").replace("durable =", "durabel = \"x\"\ndurable ="), &[]);
    assert!(unknown_source.contains("durabel"), "{unknown_source}");
    let zero = error_of(&file, &[("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "0")]);
    assert!(zero.contains("batch.max_batch_events"), "{zero}");
    let duration = error_of(&file, &[("SCORESTREAM__BATCH__MAX_WAIT", "soon")]);
    assert!(duration.contains("max_wait") || duration.contains("soon"), "{duration}");
    let kind = error_of(&file, &[("SCORESTREAM__SOURCE__TYPE", "redis")]);
    assert!(kind.contains("redis"), "{kind}");
    let device = error_of(&file, &[("SCORESTREAM__MODEL__DEVICES", r#"["tpu:0"]"#)]);
    assert!(device.contains("model.devices"), "{device}");
    let eos = error_of(
        &example("kafka.toml").replace("delivery = \"at_least_once\"", "delivery = \"exactly_once\"").replace(
            "[dead_letter]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"conversations.dead\"",
            "[dead_letter]\ntype = \"file\"\npath = \"dl.jsonl\"",
        ),
        &[],
    );
    assert!(eos.contains("sink.delivery"), "{eos}");
    let auth = error_of(&example("nats.toml"), &[("SCORESTREAM__SOURCE__USER", "worker")]);
    assert!(auth.contains("source.user"), "{auth}");
    let syntax = error_of("[model\npath=", &[]);
    assert!(syntax.contains("not valid TOML"), "{syntax}");
    // A conversation of max_tokens must fit one batch (the engine is sized for the batch).
    let unbatchable = error_of(&file, &[("SCORESTREAM__BATCH__MAX_BATCH_TOKENS", "2048")]);
    assert!(unbatchable.contains("model.max_tokens") && unbatchable.contains("2048"), "{unbatchable}");
    // f32 is the CPU reference format: refused with a GPU before anything loads; f16 is no dtype.
    let f32_gpu = error_of(&file, &[("SCORESTREAM__MODEL__DEVICES", r#"["cuda:0"]"#)]);
    assert!(f32_gpu.contains("model.dtype") && f32_gpu.contains("\"bf16\""), "{f32_gpu}");
    let f16 = error_of(&file.replace("dtype = \"f32\"", "dtype = \"f16\""), &[]);
    assert!(f16.contains("f16") && f16.contains("auto") && f16.contains("bf16"), "{f16}");
}

#[test]
fn check_config_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, example("nats.toml")).unwrap();
    scorestream::config::check_config(&path).unwrap();
    let missing = scorestream::config::check_config(&dir.path().join("nope.toml")).unwrap_err();
    assert!(missing.to_string().contains("nope.toml"));
}

#[test]
fn overrides_follow_the_types_of_the_schema() {
    let eos = example("kafka.toml").replace("delivery = \"at_least_once\"", "delivery = \"exactly_once\"");
    let c = parse(
        &eos,
        &[
            ("SCORESTREAM__SINK__TRANSACTIONAL_ID", "42"),
            ("SCORESTREAM__SOURCE__GROUP_ID", "7"),
            ("SCORESTREAM__SOURCE__TOPICS", r#"["a", "b"]"#),
            ("SCORESTREAM__SOURCE__OPTIONS__FETCH.MIN.BYTES", "1"),
            ("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "32"),
        ],
    )
    .unwrap();
    let SinkConfig::Kafka(s) = &c.sink else { panic!("kafka sink expected") };
    assert_eq!(s.transactional_id.as_deref(), Some("42"));
    let SourceConfig::Kafka(k) = &c.source else { panic!("kafka source expected") };
    assert_eq!((k.group_id.as_str(), k.topics.len(), k.options.0["fetch.min.bytes"].as_str()), ("7", 2, "1"));
    assert_eq!(c.batch.max_batch_events, 32);
    let nats = parse(&example("nats.toml"), &[("SCORESTREAM__SOURCE__PASSWORD", "1e3"), ("SCORESTREAM__SOURCE__USER", "true")]).unwrap();
    let SourceConfig::Nats(n) = &nats.source else { panic!("nats source expected") };
    assert_eq!((n.user.as_deref(), n.password.as_ref().map(|p| p.expose())), (Some("true"), Some("1e3")));
}

#[test]
fn the_config_check_and_the_engine_read_devices_alike() {
    for name in ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:", "cuda:+1", "gpu", "cuda:x"] {
        let list = format!(r#"["{name}"]"#);
        // (dtype "auto": "f32", the file's, is refused with a GPU whatever the syntax.)
        let env = [("SCORESTREAM__MODEL__DEVICES", list.as_str()), ("SCORESTREAM__MODEL__DTYPE", "auto")];
        let config = parse(&example("file.toml"), &env);
        let engine = scorestream::engine::parse_device(name);
        // A build without the CUDA engine refuses what it cannot run; the syntax is shared.
        if cfg!(feature = "cuda") || name == "cpu" || config.is_err() {
            assert_eq!(config.is_ok(), engine.is_ok(), "{name}: config {config:?}, engine {engine:?}");
        }
    }
}

#[test]
fn secrets_stay_out_of_error_messages() {
    let nats = example("nats.toml");
    let broken = nats.replace("durable =", "password = hunter2-unquoted\ndurable =");
    let e = error_of(&broken, &[]);
    assert!(e.contains("not valid TOML") && !e.contains("hunter2"), "{e}");
    let inline = example("kafka.toml").replace("[sink]", "[sink]\noptions = { \"sasl.password\" = s3cret-value }");
    let e = error_of(&inline, &[]);
    assert!(!e.contains("s3cret"), "{e}");
    let array = nats.replace("durable =", "password = [\"pa55\", \"word\"]\ndurable =");
    let e = error_of(&array, &[]);
    assert!(e.contains("expected a secret (token or password) as a string"), "{e}");
    assert!(!e.contains("untagged") && !e.contains("pa55"), "{e}");
}

#[test]
fn brokers_are_a_list_or_a_comma_string() {
    let kafka = example("kafka.toml");
    let brokers = |c: &Config| match (&c.source, &c.sink) {
        (SourceConfig::Kafka(k), SinkConfig::Kafka(s)) => (k.brokers.clone(), s.brokers.clone()),
        _ => panic!("kafka source and sink expected"),
    };
    let listed = kafka.replacen(r#"brokers = "127.0.0.1:9092""#, r#"brokers = ["a:9092", "b:9093"]"#, 2);
    assert_ne!(listed, kafka);
    assert_eq!(brokers(&parse(&listed, &[]).unwrap()), ("a:9092,b:9093".into(), "a:9092,b:9093".into()));
    let env = [("SCORESTREAM__SOURCE__BROKERS", r#"["x:1", "[::1]:2"]"#), ("SCORESTREAM__SINK__BROKERS", "y:1,z:2")];
    assert_eq!(brokers(&parse(&kafka, &env).unwrap()), ("x:1,[::1]:2".into(), "y:1,z:2".into()));
    let wrong = error_of(&kafka.replacen(r#"brokers = "127.0.0.1:9092""#, "brokers = 9092", 1), &[]);
    assert!(wrong.contains("a list of \"host:port\" strings or one comma-separated string"), "{wrong}");
}

#[test]
fn schema_errors_name_the_line_or_the_variable() {
    let file = example("file.toml");
    let line = |needle: &str| file.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let e = error_of(&file.replace("max_batch_events = 256", "max_batch_events = \"many\""), &[]);
    let at = format!("invalid config test, line {}, column 20", line("max_batch_events"));
    assert!(e.starts_with(&at) && e.contains("max_batch_events = \"many\""), "{e}");
    let e = error_of(&file.replace("[batch]", "[batch]\nmax_batch_size = 3"), &[]);
    assert!(e.contains(&format!("line {}, column 1", line("[batch]") + 1)), "{e}");
    // Set by an override: the variable is named, not a line of the file.
    let e = error_of(&file, &[("SCORESTREAM__BATCH__MAX_WAIT", "soon"), ("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "8")]);
    assert!(e.starts_with("environment variable SCORESTREAM__BATCH__MAX_WAIT: ") && e.contains("`batch.max_wait`"), "{e}");
    let e = error_of(&file, &[("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "0")]);
    assert!(e.starts_with("environment variable SCORESTREAM__BATCH__MAX_BATCH_EVENTS: batch.max_batch_events: "), "{e}");
    let e = error_of(&file, &[("SCORESTREAM__SOURCE__TYPE", "kafka")]);
    assert!(e.starts_with("environment variable SCORESTREAM__SOURCE__TYPE: ") && e.contains("unknown field `path`"), "{e}");
    // A secret on the quoted line stays hidden.
    let nats = example("nats.toml");
    let e = error_of(&nats.replace("durable =", "password = [\"pa55\", \"word\"]\ndurable ="), &[]);
    assert!(e.contains("line ") && !e.contains("pa55"), "{e}");
}

#[test]
fn reward_buckets_are_configurable_and_checked() {
    let file = example("file.toml");
    assert_eq!(parse(&file, &[]).unwrap().metrics.reward_buckets.len(), 41, "default: -10..10 by 0.5");
    let set = parse(&file, &[("SCORESTREAM__METRICS__REWARD_BUCKETS", "[-2, 0, 2.5]")]).unwrap();
    assert_eq!(set.metrics.reward_buckets, [-2.0, 0.0, 2.5]);
    let e = error_of(&file, &[("SCORESTREAM__METRICS__REWARD_BUCKETS", "[1, 0]")]);
    assert!(e.contains("metrics.reward_buckets") && e.contains("increase"), "{e}");
}
