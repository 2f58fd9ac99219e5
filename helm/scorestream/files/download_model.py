"""Init container: download a Hugging Face model repo into MODEL_DIR before the worker starts.

Files already present are not fetched again: a marker file records the last complete download
(repo, revision, patterns) and skips the network entirely when it matches; otherwise
huggingface_hub's snapshot_download compares each local file with the remote one and fetches only
what is missing or changed. The token (HF_TOKEN, from a Secret) is read by huggingface_hub from
the environment and never written to disk. Proxies and mirrors (HTTPS_PROXY, HF_ENDPOINT) come
from the container's environment (model.download.env). Nothing is installed at run time.
"""

import json
import os
import pathlib
import sys

repo = os.environ["HF_REPO"]
revision = os.environ.get("HF_REVISION") or "main"
patterns = json.loads(os.environ.get("HF_ALLOW_PATTERNS") or "null")
dest = pathlib.Path(os.environ["MODEL_DIR"])
marker = dest / ".scorestream-download.json"
wanted = {"repo": repo, "revision": revision, "allow_patterns": patterns}

if marker.is_file() and json.loads(marker.read_text()) == wanted:
    print(f"{repo}@{revision} already in {dest}; nothing to download", flush=True)
    sys.exit(0)

try:
    import huggingface_hub
except ImportError:
    # Nothing is installed at run time (air-gapped clusters, reproducible pods): the image must
    # carry huggingface_hub (docker/model-downloader.Dockerfile builds one).
    print(
        "huggingface_hub is not installed in this image: set model.download.image to an image "
        "that has it (docker/model-downloader.Dockerfile in the scorestream repository)",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(2)

dest.mkdir(parents=True, exist_ok=True)
print(f"downloading {repo}@{revision} into {dest}", flush=True)
huggingface_hub.snapshot_download(
    repo_id=repo, revision=revision, local_dir=dest, allow_patterns=patterns
)
marker.write_text(json.dumps(wanted))
print("download complete", flush=True)
