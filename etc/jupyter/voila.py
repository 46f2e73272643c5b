"""Voila settings for `make demo` (found through JUPYTER_CONFIG_PATH=etc/jupyter).

- template "vmlab" (etc/jupyter/data/voila/templates/vmlab): Voila's lab template with no CDN fetch.
- Closing a dashboard's tab stops its kernel, and with it the dashboard's VMs (QEMU dies with the
  kernel: vmlab's reaper and PR_SET_PDEATHSIG). Voila's page asks for that in `beforeunload` with a
  POST to /voila/api/shutdown/<kernel> that must carry the `_xsrf` cookie; Voila sets that cookie
  only on its tree page, so a dashboard opened by its own URL could not shut its kernel down. The
  prelaunch hook below sets the cookie on every dashboard page.
- Kernels whose page went away without saying so (a crashed browser, a lost network) are culled after
  10 idle minutes; a dashboard still open keeps its connection and is never culled.
"""

c = get_config()  # type: ignore[name-defined]  # noqa: F821  (traitlets config file)

c.VoilaConfiguration.template = "vmlab"
c.VoilaConfiguration.strip_sources = True


def _set_xsrf_cookie(handler, notebook, cwd):
    handler.xsrf_token  # tornado sets the _xsrf cookie the first time the token is read
    return notebook


c.VoilaConfiguration.prelaunch_hook = _set_xsrf_cookie
c.MappingKernelManager.cull_idle_timeout = 300
c.MappingKernelManager.cull_interval = 60
c.MappingKernelManager.cull_connected = False
