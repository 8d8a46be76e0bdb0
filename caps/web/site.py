"""
The web site: the pages, the static files, the JSON API and the metrics,
for one observer; the headers every response carries; and the checks made
before anything else (requests from other sites, DNS rebinding).
"""

import ipaddress
import os

from twisted.web import resource, server, static

from caps.limits import Admission, Limits
from caps.web.api import EVERYTHING, Api, ErrorResource, forbidden, not_found
from caps.web.guard import guarded
from caps.web.stream import Streams

STATIC = os.path.join(os.path.dirname(__file__), "static")
# Seconds an HTTP connection may stay idle (not while a request, a stream
# say, is being answered).
IDLE_TIMEOUT = 60

SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)
_SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")


def _forbidden_resource(error):
    return ErrorResource(error.status, error.code, str(error))


class _WholeFile:
    """
    Writes a whole file at once: the pages and their files are small.
    """

    def __init__(self, request, file):
        self.request = request
        self.file = file

    def start(self):
        with self.file:
            self.request.write(self.file.read())
        self.request.finish()


class StaticFiles(static.File):
    """
    The files of a directory, without listings, with JSON errors and
    explicit types for what the pages use.  Each file is written at once,
    whole (a C{Range} is ignored, as HTTP allows).
    """

    contentTypes = {
        **static.File.contentTypes,
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".json": "application/json",
    }
    childNotFound = not_found("no such file")
    forbidden = ErrorResource(403, "forbidden", "not a file")

    def directoryListing(self):
        return not_found("no such file")

    def makeProducer(self, request, fileForReading):
        self._setContentHeaders(request)
        request.setResponseCode(200)
        return _WholeFile(request, fileForReading)


class Page(resource.Resource):
    """
    One page of the static directory, whatever the rest of the path (the
    page's script reads it).
    """

    isLeaf = True

    def __init__(self, path):
        super().__init__()
        self.path = path

    def render(self, request):
        if not os.path.isfile(self.path):
            return not_found("the page is not installed").render(request)
        return StaticFiles(self.path).render(request)


class Root(resource.Resource):
    """
    Everything one observer (a L{caps.acl.Permissions}, or L{EVERYTHING})
    may reach.
    """

    def __init__(self, broker, view, static_dir, metrics, streams):
        super().__init__()
        self.broker = broker
        self.view = view
        self.static_dir = static_dir
        self.metrics = metrics
        self.streams = streams

    def getChild(self, name, request):
        view = self.view
        if name == b"":
            if request.postpath:
                return not_found()
            if not view.sees_all:
                return _forbidden_resource(
                    forbidden('only an operator (observe = ["*"]) sees every client')
                )
            return Page(os.path.join(self.static_dir, "operator.html"))
        if name == b"api":
            return Api(self.broker, view, self.streams.render)
        if name == b"static":
            return StaticFiles(self.static_dir)
        if name == b"store":
            path = request.postpath
            if len(path) != 1 or not path[0]:
                return not_found()
            client_id = path[0].decode("utf-8", "replace")
            if not view.sees(client_id):
                return _forbidden_resource(
                    forbidden(f"{view.client_id} may not see {client_id}'s queues")
                )
            return Page(os.path.join(self.static_dir, "store.html"))
        if name == b"metrics" and self.metrics is not None:
            if not view.sees_all:
                return _forbidden_resource(
                    forbidden('only an operator (observe = ["*"]) sees the metrics')
                )
            return self.metrics
        return not_found()


def _hostname(host):
    """
    The name in a C{Host} header, without the port.
    """
    host = host.decode("ascii", "replace").lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def _named_host(request):
    """
    Whether the request names its host by a DNS name other than
    C{localhost}: in a browser, a page of another site could have pointed
    that name at this address (DNS rebinding).
    """
    host = request.getHeader(b"host")
    if host is None:
        return False
    name = _hostname(host)
    if name == "localhost" or name.endswith(".localhost"):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def _cross_site(request):
    """
    Whether a browser sent this request for a page of another site (or
    another port of this one).
    """
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site in (b"cross-site", b"same-site"):
        return True
    origin = request.getHeader(b"origin")
    if origin is None:
        return False
    return origin.partition(b"://")[2] != (request.getHeader(b"host") or b"")


class _Request(server.Request):
    """
    A request that can be finished after its client left: an answer that
    came late (a failed login's, or one that waited for a password check)
    is then dropped instead of raising.
    """

    def write(self, data):
        if self.channel is not None:
            super().write(data)

    def finish(self):
        if self.channel is not None:
            super().finish()


class WebSite(server.Site):
    """
    A L{server.Site} that adds the security headers to every response and
    turns away, before anything else:

      - requests that change something (C{POST}) sent by a browser for
        another site's page (cross-site request forgery; with C{--auth} the
        browser would add the password it remembers);
      - on an open broker, requests naming the host by a DNS name (a page
        of another site could have pointed its name at the broker).
    """

    displayTracebacks = False
    noisy = False
    open = True
    requestFactory = _Request

    def getResourceFor(self, request):
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        if request.method not in _SAFE_METHODS and _cross_site(request):
            return ErrorResource(
                403, "forbidden", "a request from another site's page; refused"
            )
        if self.open and _named_host(request):
            return ErrorResource(
                403,
                "forbidden",
                "this broker is open (no --auth): use its IP address or "
                "localhost in the URL, not a DNS name",
            )
        return super().getResourceFor(request)


def make_site(broker, portal=None, metrics=None, static_dir=STATIC, admission=None):
    """
    The broker's web site.

    @param portal: the broker's twisted.cred portal (L{caps.auth.Realm}
        behind it), or L{None} for an open broker: then every path needs
        HTTP basic authentication against the same checkers, and shows
        what the logged-in client's permissions let it see.
    @param metrics: an C{IResource} served at C{/metrics}, or L{None}.
    @param static_dir: the directory of the pages and their files.
    @param admission: the L{caps.limits.Admission} whose count of failed
        logins per address slows web logins down as it does the broker's
        (a fresh one if not given).
    """
    streams = Streams(broker)

    def tree(view):
        return Root(broker, view, static_dir, metrics, streams)

    if portal is None:
        root = tree(EVERYTHING)
    else:
        root = guarded(portal, tree, admission or Admission(Limits()), broker.clock)
    site = WebSite(root, timeout=IDLE_TIMEOUT, reactor=broker.clock)
    site.open = portal is None
    site.streams = streams
    return site
