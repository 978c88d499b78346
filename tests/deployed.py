"""Starts the app the way the files in deploy/ describe: systemd ExecStart lines, uWSGI ini files, the Apache vhost.

Each deploy file names its example paths and address (/srv/relay, its virtualenv, port
8000 on 127.0.0.1); a test renders the file with its own and runs what comes out, so the
shipped files are the ones tested.
"""
import fcntl
import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from tests.servers import ROOT, RunningServer, app_environment, free_port, stop_process_group, wait_until_healthy

DEPLOY = os.path.join(ROOT, "deploy")
EXAMPLE_ROOT = "/srv/relay"
EXAMPLE_VENV = "/srv/relay/venv"
EXAMPLE_ADDRESS = "127.0.0.1:8000"
APACHE_MODULES = "/usr/lib/apache2/modules"
APACHE_USER = "www-data"
# mod_wsgi from Debian runs Debian's Python, so the Apache test needs a virtualenv made with it.
DEBIAN_PYTHON = "/usr/bin/python3"
NOT_DEPLOYED = (".*", "tests", "bench", "docs", "instance", "node_modules", "__pycache__", "*.db", "*.db-*")


def read_deploy_file(name):
    """Returns the text of a file in deploy/."""
    with open(os.path.join(DEPLOY, name)) as handle:
        return handle.read()


def render(text, replacements):
    """Returns text with each (old, new) replaced, in order; every old must occur, so the test follows the file."""
    for old, new in replacements:
        assert old in text, f"{old!r} is no longer in the deploy file; update the test that renders it"
        text = text.replace(old, new)
    return text


def placeholders(port, root=ROOT, venv=sys.prefix):
    """Returns the replacements that point a deploy file at this checkout, this Python and port."""
    return [(EXAMPLE_VENV, venv), (EXAMPLE_ROOT, root), (EXAMPLE_ADDRESS, f"127.0.0.1:{port}")]


def unit_command(unit_name, port):
    """Returns (argv, working directory) of a systemd unit in deploy/, rendered for this checkout."""
    settings = {}
    for line in read_deploy_file(unit_name).splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStart", "WorkingDirectory"):
            settings[key] = value
    command = render(settings["ExecStart"], [(EXAMPLE_VENV, sys.prefix)])
    for old, new in placeholders(port)[1:]:
        command = command.replace(old, new)
    argv = shlex.split(command)
    return argv, render(settings["WorkingDirectory"], [(EXAMPLE_ROOT, ROOT)])


def start_logged(argv, cwd, env, log_path):
    """Starts argv in its own process group, its output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def read_tail(path, size=4000):
    """Returns the end of a log file, headed by its name, for an error message."""
    try:
        with open(path, errors="replace") as handle:
            return f"--- {path} ---\n{handle.read()[-size:]}\n"
    except OSError:
        return ""


@contextmanager
def serving(argv, cwd, env, workdir, port, log_path=None, startup_seconds=40.0):
    """Runs a server command, waits until /healthz answers, yields its RunningServer, then stops it.

    log_path names the server's own log when it keeps one (the command's output goes to server.log).
    """
    output_path = os.path.join(workdir, "server.log")
    process = start_logged(argv, cwd, env, output_path)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path or output_path, workdir)
    try:
        try:
            wait_until_healthy(server, process, startup_seconds)
        except RuntimeError as error:
            logs = "".join(read_tail(path) for path in {output_path, server.log_path})
            raise RuntimeError(f"{error}\n{logs}") from None
        yield server
    finally:
        stop_process_group(process)


@contextmanager
def unit_server(unit_name, env=None):
    """Runs the web server of a systemd unit in deploy/ on a free port."""
    with tempfile.TemporaryDirectory(prefix="relay-unit-") as workdir:
        port = free_port()
        argv, cwd = unit_command(unit_name, port)
        with serving(argv, cwd, app_environment(env, workdir), workdir, port) as server:
            yield server


@contextmanager
def uwsgi_server(ini_name, env=None, extra_args=()):
    """Runs uWSGI with an ini file from deploy/, rendered for this checkout, on a free port."""
    with tempfile.TemporaryDirectory(prefix="relay-uwsgi-") as workdir:
        port = free_port()
        ini_path = os.path.join(workdir, "uwsgi.ini")
        with open(ini_path, "w") as handle:
            handle.write(render(read_deploy_file(ini_name), placeholders(port)))
        uwsgi = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
        argv = [uwsgi, "--ini", ini_path, *extra_args]
        with serving(argv, ROOT, app_environment(env, workdir), workdir, port) as server:
            yield server


@contextmanager
def worker_process(argv, cwd, env, workdir):
    """Runs a reply worker command; yields its Popen and stops its process group afterwards."""
    log_path = os.path.join(workdir, f"worker-{time.monotonic_ns()}.log")
    process = start_logged(argv, cwd, app_environment(env, workdir), log_path)
    process.log_path = log_path
    try:
        yield process
    finally:
        stop_process_group(process)


def apache_available():
    """Tells whether Apache and Debian's mod_wsgi are installed."""
    return (shutil.which("apache2", path="/usr/sbin:/usr/bin") is not None
            and os.path.exists(os.path.join(APACHE_MODULES, "mod_wsgi.so")) and os.path.exists(DEBIAN_PYTHON))


def debian_virtualenv():
    """Returns a virtualenv of Debian's python3 with requirements.txt installed, built once and kept.

    It lives in /var/tmp, readable by Apache's user (root's home is not), keyed by the
    requirements, and is built under a lock so parallel test runs share one.
    """
    with open(os.path.join(ROOT, "requirements.txt"), "rb") as handle:
        key = hashlib.sha256(handle.read()).hexdigest()[:12]
    path = f"/var/tmp/relay-test-venv-debian-{key}"
    if os.path.exists(os.path.join(path, "ready")):
        return path
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(path, "ready")):
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run([DEBIAN_PYTHON, "-m", "venv", path], check=True, capture_output=True)
            subprocess.run([os.path.join(path, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                            "-r", os.path.join(ROOT, "requirements.txt")], check=True, capture_output=True)
            os.chmod(path, 0o755)
            open(os.path.join(path, "ready"), "w").close()
    return path


def copy_app(target):
    """Copies the app (not its tests, data or tooling) to target, as a deployment would."""
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*NOT_DEPLOYED))


def apache_main_config(workdir, port, site_path):
    """Returns a minimal Apache main config that loads mod_wsgi and includes the rendered vhost."""
    return "\n".join([
        f"ServerRoot {workdir}",
        f"Listen 127.0.0.1:{port}",
        "ServerName 127.0.0.1",
        f"PidFile {workdir}/run/apache2.pid",
        f"DefaultRuntimeDir {workdir}/run",
        f"Mutex file:{workdir}/run default",
        f"ErrorLog {workdir}/error.log",
        "LogLevel warn wsgi:info",
        f"LoadModule mpm_event_module {APACHE_MODULES}/mod_mpm_event.so",
        f"LoadModule authz_core_module {APACHE_MODULES}/mod_authz_core.so",
        f"LoadModule wsgi_module {APACHE_MODULES}/mod_wsgi.so",
        # Held polls occupy Apache threads too: room for them.
        "ThreadsPerChild 64",
        "MaxRequestWorkers 256",
        f"User {APACHE_USER}",
        f"Group {APACHE_USER}",
        f"Include {site_path}",
        "",
    ])


@contextmanager
def apache_server(env=None):
    """Runs Apache with deploy/apache-relay.conf (mod_wsgi daemon mode) on a free port.

    The app is copied to a folder Apache's user can read, with its settings in a .env file
    there, as the vhost's comments describe; its database lives in a folder that user owns.
    """
    venv = debian_virtualenv()
    with tempfile.TemporaryDirectory(prefix="relay-apache-") as workdir:
        os.chmod(workdir, 0o755)
        port = free_port()
        app_root = os.path.join(workdir, "app")
        data = os.path.join(workdir, "data")
        copy_app(app_root)
        os.makedirs(data)
        os.makedirs(os.path.join(workdir, "run"))
        user = pwd.getpwnam(APACHE_USER)
        if os.geteuid() == 0:
            os.chown(data, user.pw_uid, user.pw_gid)
        settings = app_environment(env, data)
        names = set(env or {}) | {"INSTANCE_PATH", "DATABASE_URL"}
        with open(os.path.join(app_root, ".env"), "w") as handle:
            handle.writelines(f"{name}={settings[name]}\n" for name in sorted(names))
        site_path = os.path.join(workdir, "relay.conf")
        site = render(read_deploy_file("apache-relay.conf"),
                      [(EXAMPLE_VENV, venv), (EXAMPLE_ROOT, app_root), ("<VirtualHost *:80>", f"<VirtualHost *:{port}>")])
        with open(site_path, "w") as handle:
            handle.write(site)
        main_path = os.path.join(workdir, "apache2.conf")
        with open(main_path, "w") as handle:
            handle.write(apache_main_config(workdir, port, site_path))
        apache_env = {"PATH": "/usr/sbin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        argv = [shutil.which("apache2", path="/usr/sbin:/usr/bin"), "-f", main_path, "-DFOREGROUND"]
        with serving(argv, workdir, apache_env, workdir, port, os.path.join(workdir, "error.log")) as server:
            yield server
