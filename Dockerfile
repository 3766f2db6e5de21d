# The numbering image: the `numbering` command (worker, init-db, CLI) and the example app.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY numbering ./numbering
COPY tasks ./tasks
COPY config ./config
COPY examples ./examples
RUN pip install --no-cache-dir '.[examples]' && useradd --system numbering
USER numbering
ENTRYPOINT ["numbering"]
CMD ["--help"]
