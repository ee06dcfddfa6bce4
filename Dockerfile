FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schemas ./schemas
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["sidecar"]
