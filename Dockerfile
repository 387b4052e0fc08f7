# opengem: one image for every daemon; the command picks it (`opengem stream`, `train`,
# `serve`, `monitor`, `simulate`, `demo`, ...). Runs as the non-root user `opengem`.
#
#   docker build -t opengem .                        # CPU (requirements/cpu.lock)
#   docker build -t opengem:cuda --build-arg ACCEL=cuda .   # CUDA wheels (requirements/cuda.lock);
#                                                    # run with --gpus all (NVIDIA container toolkit)
#   docker run --rm -p 127.0.0.1:9104:9104 opengem demo --duration 60
#
# The install mirrors `make install` (Makefile): the same uv version, `uv pip sync` of the
# lock, the PyTorch CPU index for ACCEL=cpu, then opengem itself without dependencies.
# CUDA needs no CUDA base image: the CUDA torch/fbgemm wheels bring their libraries and
# the container toolkit brings the driver.

FROM python:3.11-slim-bookworm

ARG ACCEL=cpu
ARG UV_VERSION=0.13.9
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    PATH=/opt/venv/bin:$PATH \
    OPENGEM_DATA_DIR=/data

RUN groupadd --gid 10001 opengem \
    && useradd --create-home --uid 10001 --gid 10001 opengem \
    && mkdir -p /data && chown opengem:opengem /data

WORKDIR /opt/opengem

# Dependencies first: this layer is rebuilt only when a lock changes.
COPY requirements/ requirements/
RUN test "$ACCEL" = cpu -o "$ACCEL" = cuda || { echo "ACCEL must be cpu or cuda"; exit 1; } \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install -q "uv==${UV_VERSION}" \
    && if [ "$ACCEL" = cpu ]; then \
         /opt/venv/bin/uv pip sync --python /opt/venv/bin/python \
           --extra-index-url "${TORCH_INDEX}" --index-strategy unsafe-best-match "requirements/${ACCEL}.lock"; \
       else \
         /opt/venv/bin/uv pip sync --python /opt/venv/bin/python "requirements/${ACCEL}.lock"; \
       fi

COPY pyproject.toml README.md __init__.py cli.py config.py demo.py ./
COPY stream/ stream/
COPY features/ features/
COPY model/ model/
COPY kernels/ kernels/
COPY serving/ serving/
COPY ops/ ops/
RUN /opt/venv/bin/uv pip install --python /opt/venv/bin/python --no-deps . \
    && python -c "import torch, torchrec, fbgemm_gpu, triton, faust, rocksdict, pyarrow; print('opengem env ok: torch', torch.__version__, 'torchrec', torchrec.__version__)" \
    && opengem --help > /dev/null

# Numeric, so that a runtime that cannot resolve names (e.g. runAsNonRoot checks) sees a non-root uid.
USER 10001:10001
WORKDIR /home/opengem
VOLUME /data
# 9101-9104: metrics of stream, train, serve, monitor; 50051: gRPC ranking.
EXPOSE 9101 9102 9103 9104 50051
ENTRYPOINT ["opengem"]
CMD ["demo", "--duration", "0"]
