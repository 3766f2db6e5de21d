# The numbering image: the `numbering` command (worker, init-db, CLI) and nothing else.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY numbering ./numbering
COPY tasks ./tasks
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system numbering
USER numbering
ENTRYPOINT ["numbering"]
CMD ["--help"]
