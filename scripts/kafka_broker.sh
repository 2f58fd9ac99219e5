#!/usr/bin/env bash
# An Apache Kafka broker for the tests, from Maven Central (Debian has none): the broker's jars
# and an slf4j binding, fetched by Maven into target/tools/kafka/lib and kept there (a few tens
# of MB; skipped when present). The tests start it themselves (single-node KRaft, combined
# broker + controller, Java 17+): see tests/kafka_common/broker.rs.
#
#   scripts/kafka_broker.sh install    fetch the jars (once)
#   scripts/kafka_broker.sh lib        print the folder holding them
set -euo pipefail
cd "$(dirname "$0")/.."

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
home="$PWD/target/tools/kafka"
lib="$home/lib"

install() {
    if [ -f "$lib/.kafka-$KAFKA_VERSION" ]; then
        return
    fi
    command -v java >/dev/null || { echo "java (17+) is missing: apt-get install openjdk-17-jre-headless" >&2; exit 1; }
    command -v mvn >/dev/null || { echo "mvn is missing: apt-get install maven" >&2; exit 1; }
    mkdir -p "$home"
    cat > "$home/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>scorestream.test</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka logs through slf4j 1.7: its simple binding writes to stderr. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>1.7.36</version>
    </dependency>
  </dependencies>
</project>
POM
    rm -rf "$lib.tmp"
    mvn -q -B -f "$home/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$lib.tmp"
    rm -rf "$lib"
    mv "$lib.tmp" "$lib"
    touch "$lib/.kafka-$KAFKA_VERSION"
    echo "Apache Kafka $KAFKA_VERSION: $(ls "$lib" | wc -l) jars in $lib"
}

case "${1:-}" in
    install) install ;;
    lib) echo "$lib" ;;
    *) echo "usage: $0 install|lib" >&2; exit 2 ;;
esac
