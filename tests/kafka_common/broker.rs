//! An Apache Kafka broker for the tests: single-node KRaft (broker and controller in one JVM),
//! from the jars `scripts/kafka_broker.sh install` fetched into `target/tools/kafka/lib`, on
//! free loopback ports with a log directory of its own. It can be killed and started again on
//! the same ports and log directory (a broker restart). Besides the plaintext listener it
//! serves SASL/SCRAM-SHA-512 (user [`SCRAM_USER`], created when the storage is formatted) and
//! TLS (a CA and a server certificate made with openssl for this broker).
//!
//! A missing install is a failure under `CI` and a skip elsewhere (the project's policy).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::Producer;
use rdkafka::ClientConfig;

/// The SCRAM user created at storage format, and its password.
pub const SCRAM_USER: (&str, &str) = ("scorer", "scorer-secret");

/// How long a (re)started broker may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    lib: PathBuf,
    /// Plaintext listener.
    pub bootstrap: String,
    /// SASL_PLAINTEXT listener (SCRAM-SHA-512).
    pub sasl_bootstrap: String,
    /// SSL listener; its certificate is signed by [`Broker::ca`].
    pub tls_bootstrap: String,
}

/// The folder with the broker's jars, `None` (a skip) when it is not installed outside CI.
fn lib_dir() -> Option<PathBuf> {
    let lib = std::env::var_os("SCORESTREAM_KAFKA_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/kafka/lib"));
    let installed = std::fs::read_dir(&lib).map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("kafka_2.13"))).unwrap_or(false);
    if installed {
        return Some(lib);
    }
    let what = format!("Apache Kafka is not installed in {}", lib.display());
    super::missing_tool::skip_or_fail(&what, "run scripts/kafka_broker.sh install (.ci/run does)");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for 127.0.0.1 signed by it; the broker's PEM keystore (key +
/// certificate) at `dir/keystore.pem`, the CA at `dir/ca.pem`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=scorestream-test-ca"]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(&[
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
    ]);
    let keystore = [std::fs::read_to_string(dir.join("server.key")).unwrap(), std::fs::read_to_string(dir.join("server.pem")).unwrap()].concat();
    std::fs::write(dir.join("keystore.pem"), keystore).unwrap();
}

impl Broker {
    /// A formatted and started broker holding `topics` (name, partitions); `None` outside CI
    /// when Kafka is not installed.
    pub async fn start(topics: &[(&str, i32)]) -> Option<Self> {
        Self::start_with(topics, "").await
    }

    /// [`Broker::start`] with `extra` lines appended to the broker's `server.properties`.
    pub async fn start_with(topics: &[(&str, i32)], extra: &str) -> Option<Self> {
        let lib = lib_dir()?;
        let dir = tempfile::tempdir().unwrap();
        let [plain, controller, sasl, tls] = [(); 4].map(|_| free_port());
        make_certificates(dir.path());
        let properties = format!(
            "process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners=PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller},SASL_PLAINTEXT://127.0.0.1:{sasl},SSL://127.0.0.1:{tls}
advertised.listeners=PLAINTEXT://127.0.0.1:{plain},SASL_PLAINTEXT://127.0.0.1:{sasl},SSL://127.0.0.1:{tls}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
",
            data = dir.path().join("data").display(),
            keystore = dir.path().join("keystore.pem").display(),
        ) + extra;
        std::fs::write(dir.path().join("server.properties"), properties).unwrap();
        let cluster_id = {
            let out = Command::new("java").arg("-cp").arg(lib.join("*")).args(["kafka.tools.StorageTool", "random-uuid"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned()
        };
        let scram = format!("SCRAM-SHA-512=[name={},password={}]", SCRAM_USER.0, SCRAM_USER.1);
        run(Command::new("java").arg("-cp").arg(lib.join("*")).args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"]).arg(dir.path().join("server.properties")).args(["--standalone", "--add-scram", &scram]));
        let mut broker = Self {
            child: None,
            dir,
            lib,
            bootstrap: format!("127.0.0.1:{plain}"),
            sasl_bootstrap: format!("127.0.0.1:{sasl}"),
            tls_bootstrap: format!("127.0.0.1:{tls}"),
        };
        broker.restart().await;
        broker.create_topics(topics).await;
        Some(broker)
    }

    /// The CA that signed the TLS listener's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The broker's own log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Start the broker (again) on its ports and log directory; returns once it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log()).unwrap();
        let child = Command::new("java")
            // Small heap, quick start: the tests move little data.
            .args(["-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Djava.awt.headless=true"])
            .arg("-cp")
            .arg(self.lib.join("*"))
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let bootstrap = self.bootstrap.clone();
        let start = Instant::now();
        let answered = tokio::task::spawn_blocking(move || {
            let probe: rdkafka::producer::BaseProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
            while start.elapsed() < START_TIMEOUT {
                if let Ok(m) = probe.client().fetch_metadata(None, Duration::from_secs(2)) {
                    if !m.brokers().is_empty() {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
        .await
        .unwrap();
        assert!(answered, "the Kafka broker did not answer within {START_TIMEOUT:?}; its log: {}", self.log().display());
        eprintln!("Kafka broker up at {} in {:?}", self.bootstrap, start.elapsed());
    }

    /// kill -9 the broker (its log directory stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().unwrap();
        let new: Vec<NewTopic> = topics.iter().map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1))).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in admin.create_topics(&new, &options).await.unwrap() {
            r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
