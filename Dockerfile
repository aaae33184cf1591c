FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 conveyor
WORKDIR /app
COPY pyproject.toml README.md babel.cfg ./
COPY bot ./bot
COPY engine ./engine
COPY templates ./templates
COPY locales ./locales
# Editable install: templates/ and locales/ are read from /app at run time.
RUN pip install --no-cache-dir -e . && mkdir -p /data && chown conveyor:conveyor /data

USER conveyor
ENV ORCH_DB_PATH=/data/conveyor.db \
    ORCH_WORKDIR=/data/work \
    ORCH_HTTP_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8080
CMD ["conveyor", "run"]
