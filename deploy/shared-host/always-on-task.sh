#!/bin/sh
# The always-on task of a shared host (thread-free mode): runs every reply for the
# thread-free web processes of uwsgi.ini beside this file. Give the host this command:
#     sh /srv/relay/deploy/shared-host/always-on-task.sh
# The host restarts the task when it ends; a reply it was running then ends as
# "failed: worker_lost". tests/test_worker_mode.py runs this very script.
cd /srv/relay || exit 1
export GENERATION_MODE=worker
exec /srv/relay/venv/bin/flask --app app worker --concurrency 16
