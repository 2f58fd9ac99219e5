# syntax=docker/dockerfile:1
# The chart's model-download init container (model.source: download): python3 with
# huggingface_hub preinstalled, so nothing is installed when the pod starts (air-gapped clusters
# mirror this image). It runs helm/scorestream/files/download_model.py, mounted from a ConfigMap.
#   docker build -f docker/model-downloader.Dockerfile -t ghcr.io/scorestream/model-downloader:0.1.0 .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim
ARG HUGGINGFACE_HUB_VERSION=">=0.30,<2"
RUN pip install --no-cache-dir "huggingface_hub${HUGGINGFACE_HUB_VERSION}" \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp downloader
USER 10001:10001
ENV HOME=/tmp HF_HOME=/tmp/hf HF_HUB_DISABLE_TELEMETRY=1
