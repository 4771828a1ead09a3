# The same install as the README's `make run`, in an image. The embedded PostgreSQL keeps its data
# in /data; point --upstream at your own server to use that instead.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml setup.py README.md Makefile config.example.toml ./
COPY proxy ./proxy
COPY inference ./inference
COPY catalog ./catalog
# The relay thread (proxy/_fastrelay.c) is compiled here; the compiler leaves with the layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
ENV AZURE_LOCAL_AI_PROXY_DATA_DIR=/data \
    AZURE_LOCAL_AI_PROXY_LISTEN=0.0.0.0:6432
VOLUME /data
EXPOSE 6432
ENTRYPOINT ["azure-local-ai-proxy"]
CMD ["serve"]
