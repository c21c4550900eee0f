# lpm-node on a CUDA runtime image: `lpm-node serve` as a non-root user.
# Build:  docker build -t lpm-node .
# Run:    see the README, section "Docker" (ports, volumes, GPU flag).
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TCP_NODELAY=1 \
    PATH=/opt/lpm-node/venv/bin:$PATH

# python3 for the node, dcmtk for administrators' use (echoscu, storescu, dcmdump)
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv dcmtk \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lpm-node
COPY pyproject.toml README.md LICENSE ./
COPY lpm_node ./lpm_node
COPY config ./config
# the same install as the README's production install, with nnU-Net v1 for the published method's models
RUN python3 -m venv /opt/lpm-node/venv \
 && /opt/lpm-node/venv/bin/pip install --upgrade pip \
 && /opt/lpm-node/venv/bin/pip install ".[nnunet-v1]"

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin lpm \
 && mkdir -p /data /models \
 && chown lpm:lpm /data
VOLUME ["/data", "/models"]
USER lpm
# 11112: DICOM. 8480: the web console, served only when asked (`serve --console --console-host 0.0.0.0`, with
# users in the settings: off loopback the console refuses to start without them); publish it on the host's
# loopback for a TLS proxy (`-p 127.0.0.1:8480:8480`), see the README's "Console" section.
EXPOSE 11112 8480

# C-ECHO to the node's own listener, calling as its first allowed AE title (works with an allowlist)
HEALTHCHECK --interval=60s --timeout=15s --start-period=180s --retries=3 \
  CMD ["lpm-node", "doctor", "--liveness", "--config", "/opt/lpm-node/config/docker.toml"]

CMD ["lpm-node", "serve", "--config", "/opt/lpm-node/config/docker.toml"]
