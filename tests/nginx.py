"""Runs a real nginx (Debian's package) on 127.0.0.1 with its own prefix and config, serving deploy/nginx-relay.conf.

The system's nginx config is never read: nginx starts with `-p DIR -c FILE -e FILE`, in
the foreground, in its own process group, and is stopped by its PID.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager

from tests.deployed import read_deploy_file, render
from tests.servers import RunningServer, free_port, stop_process_group

SITE_FILE = "nginx-relay.conf"
TEMP_FOLDERS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary():
    """Returns the path of the nginx executable, or None when it is not installed."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def site_config(listen_port, app_address, read_timeout=None, extra_locations=""):
    """Returns deploy/nginx-relay.conf listening on 127.0.0.1:listen_port and proxying to app_address.

    read_timeout replaces the shipped proxy_read_timeout (30s); extra_locations are added to
    the server block, where they inherit all of its proxy settings.
    """
    replacements = [("listen 80;", f"listen 127.0.0.1:{listen_port};"),
                    ("server 127.0.0.1:8000;", f"server {app_address};")]
    if read_timeout is not None:
        replacements.append(("proxy_read_timeout 30s;", f"proxy_read_timeout {read_timeout};"))
    text = render(read_deploy_file(SITE_FILE), replacements).rstrip()
    assert text.endswith("}"), "the site file must end with its server block"
    return f"{text[:-1]}{extra_locations}\n}}\n"


def main_config(workdir, site_text):
    """Returns a whole nginx.conf: one worker, logs and temp files in workdir, and the site."""
    lines = ["daemon off;", "worker_processes 1;", f"pid {workdir}/nginx.pid;",
             f"error_log {workdir}/error.log warn;", "events { worker_connections 1024; }", "http {",
             f"    access_log {workdir}/access.log;"]
    if os.geteuid() == 0:
        # Workers would otherwise switch to "nobody", who cannot write the temp folders.
        lines.insert(0, "user root;")
    lines += [f"    {name}_temp_path {workdir}/{name};" for name in TEMP_FOLDERS]
    lines += [site_text, "}", ""]
    return "\n".join(lines)


def wait_for_port(port, process, timeout=10.0):
    """Waits until 127.0.0.1:port accepts connections; raises if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on port {port} in {timeout} s")


@contextmanager
def nginx_proxy(app_address, read_timeout=None, extra_locations=""):
    """Runs nginx with the shipped site in front of app_address; yields its base URL (a RunningServer)."""
    binary = nginx_binary()
    assert binary, "nginx is needed: apt-get install -y nginx"
    with tempfile.TemporaryDirectory(prefix="relay-nginx-") as workdir:
        port = free_port()
        for name in TEMP_FOLDERS:
            os.makedirs(os.path.join(workdir, name))
        config_path = os.path.join(workdir, "nginx.conf")
        with open(config_path, "w") as handle:
            handle.write(main_config(workdir, site_config(port, app_address, read_timeout, extra_locations)))
        error_log = os.path.join(workdir, "error.log")
        checked = subprocess.run([binary, "-t", "-p", workdir, "-c", config_path, "-e", error_log],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        with open(os.path.join(workdir, "stderr.log"), "ab") as output:
            process = subprocess.Popen([binary, "-p", workdir, "-c", config_path, "-e", error_log],
                                       stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        try:
            wait_for_port(port, process)
            yield RunningServer(f"http://127.0.0.1:{port}", process, error_log, workdir)
        finally:
            stop_process_group(process)
