# p2s-dask images for docker-compose.yml, all from this one file so that the
# client, the scheduler and the workers run the same versions of Python,
# Dask and p2s-dask (Dask requires it: tasks are pickled between them).
#
#   runtime  p2s-dask + the Dask dashboard's bokeh: scheduler, worker, demo
#   lab      runtime + JupyterLab
#   s3       moto's S3 server (see the s3 service in docker-compose.yml)

FROM python:3.11-slim AS runtime
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# an unprivileged user; uid 1000 so files written to bind mounts (the
# notebooks) belong to the usual first user of a Linux host
RUN useradd --create-home --uid 1000 p2s
WORKDIR /opt/p2s-dask
# only what the package needs, so that editing tests or notebooks does not
# invalidate the installed layer
COPY pyproject.toml README.md ./
COPY p2s_dask ./p2s_dask
# bokeh: the scheduler serves its dashboard (port 8787) only with it
RUN pip install . "bokeh>=3.1"
USER p2s
WORKDIR /home/p2s

FROM runtime AS lab
USER root
# ipywidgets: progress bars (tqdm) render as widgets in notebooks
RUN pip install "jupyterlab>=4" ipywidgets
USER p2s
RUN mkdir -p /home/p2s/notebooks
WORKDIR /home/p2s/notebooks

FROM python:3.11-slim AS s3
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN pip install "moto[server]>=5,<6" && useradd --create-home --uid 1000 moto
USER moto
