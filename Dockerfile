# Archipelago operator image. CPU-only torch (BoTorch needs it; no CUDA in the operator).
# Build: docker build -t archipelago-operator:dev .   (not buildable on the dev machines: no engine)
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# CPU-only PyTorch wheel first, so botorch does not pull the CUDA build from PyPI.
RUN pip install --prefix=/install --index-url https://download.pytorch.org/whl/cpu "torch>=2.3,<3"
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --prefix=/install .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin archipelago
COPY --from=build /install /usr/local
COPY policies /etc/archipelago/policies
ENV ARCHIPELAGO_POLICIES=/etc/archipelago/policies \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["archipelago"]
CMD ["run", "--all-namespaces"]
