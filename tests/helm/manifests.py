"""Read a `helm template` output, validate the custom resources kubernetes-validate has no schema
for (KEDA ScaledObject and TriggerAuthentication, prometheus-operator ServiceMonitor and
PrometheusRule) against the schemas
in schemas/, and print every manifest as one JSON array for tests/helm.rs.

Usage: manifests.py RENDERED.yaml   Exit 1 (with the errors on stderr) if a resource is invalid
or is of a custom kind without a schema here.
"""

import json
import pathlib
import sys

import jsonschema
import yaml

SCHEMAS = pathlib.Path(__file__).with_name("schemas")
BUILTIN_GROUPS = ("v1", "apps/v1", "policy/v1")


def main(path: str) -> int:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    failed = False
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        if api in BUILTIN_GROUPS:
            continue  # kubernetes-validate checks these
        schema_file = SCHEMAS / f"{kind}.json"
        if not schema_file.is_file():
            print(f"{kind} ({api}): no schema in {SCHEMAS}", file=sys.stderr)
            failed = True
            continue
        validator = jsonschema.Draft7Validator(json.loads(schema_file.read_text()))
        for err in validator.iter_errors(doc):
            where = ".".join(str(p) for p in err.absolute_path)
            print(f"{kind}/{doc['metadata'].get('name')}: {where}: {err.message}", file=sys.stderr)
            failed = True
    json.dump(docs, sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
