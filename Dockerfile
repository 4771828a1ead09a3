# The same install as the README's `make run`, in an image. The embedded PostgreSQL keeps its data
# in /data; point --upstream at your own server to use that instead.
# The image listens on 0.0.0.0, so with the embedded server the proxy refuses to start until you give
# the password of its superuser postgres at run time (never baked into the image):
#   docker run -e AZURE_LOCAL_AI_PROXY_EMBEDDED_PASSWORD=... -p 6432:6432 -v alp-data:/data IMAGE
# (or -e AZURE_LOCAL_AI_PROXY_EMBEDDED_TRUST=true to accept every login without a password).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml setup.py README.md Makefile config.example.toml ./
COPY proxy ./proxy
COPY inference ./inference
COPY catalog ./catalog
# The native parts (proxy/_fastrelay.c, proxy/_floattext.c) are compiled here; the compiler leaves with the layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# AZURE_LOCAL_AI_PROXY_EMBEDDED_PASSWORD: to be given with `docker run -e` (see above), not here.
ENV AZURE_LOCAL_AI_PROXY_DATA_DIR=/data \
    AZURE_LOCAL_AI_PROXY_LISTEN=0.0.0.0:6432
VOLUME /data
EXPOSE 6432
ENTRYPOINT ["azure-local-ai-proxy"]
CMD ["serve"]
