"""
HTTP basic authentication for the web site, through twisted.cred's guard:
the broker's own checkers, and a realm that gives each logged-in client
the resource tree its permissions allow.
"""

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import task
from twisted.logger import Logger
from twisted.web.guard import BasicCredentialFactory, HTTPAuthSessionWrapper
from twisted.web.resource import IResource
from zope.interface import implementer

from caps.auth import IClient
from caps.gate import login_delay

REALM = b"CAPS"


@implementer(IRealm)
class WebRealm:
    """
    Gives a logged-in clientId the resource tree bound to its permissions.

    @param realm: the broker's realm (a L{caps.auth.Realm}), which gives the
        permissions.
    @param tree: makes the tree of one observer (its L{IClient}).
    """

    def __init__(self, realm, tree):
        self.realm = realm
        self.tree = tree

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IResource not in interfaces:
            raise NotImplementedError("the web realm gives only IResource avatars")
        _, client, logout = self.realm.requestAvatar(avatarId, mind, IClient)
        return IResource, self.tree(client), logout


class _AddressedBasic(BasicCredentialFactory):
    """
    Basic credentials that remember the address they came from.
    """

    def decode(self, response, request):
        credentials = super().decode(response, request)
        credentials.address = getattr(request.getClientAddress(), "host", None)
        return credentials


@implementer(ICredentialsChecker)
class _Slowed:
    """
    A checker whose failures are answered late, as the broker answers a
    failed login: 1 s doubling per failure from the same address lately,
    up to 30 s (basic auth sends the password with every request, so
    without this a guesser could try as fast as scrypt checks).
    """

    log = Logger()

    def __init__(self, checker, admission, clock):
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self.admission = admission
        self.clock = clock

    def requestAvatarId(self, credentials):
        d = self.checker.requestAvatarId(credentials)
        return d.addErrback(self._failed, credentials)

    def _failed(self, failure, credentials):
        failure.trap(UnauthorizedLogin)
        address = getattr(credentials, "address", None)
        count = self.admission.login_failed(address, self.clock.seconds())
        delay = login_delay(count)
        self.log.warn(
            "web login as {clientId} from {address} failed ({count} failure(s) "
            "from there lately); answering in {delay} s",
            clientId=getattr(credentials, "username", b"").decode("utf-8", "replace"),
            address=address,
            count=count,
            delay=delay,
        )
        return task.deferLater(self.clock, delay, failure.raiseException)


def guarded(portal, tree, admission, clock):
    """
    A resource asking for HTTP basic authentication (realm C{CAPS}) with
    the checkers of C{portal}, then serving C{tree(permissions)}; failed
    logins are answered late, counted per address in C{admission}.
    """
    checkers = [
        _Slowed(checker, admission, clock)
        for checker in dict.fromkeys(portal.checkers.values())
    ]
    web = Portal(WebRealm(portal.realm, tree), checkers)
    return HTTPAuthSessionWrapper(web, [_AddressedBasic(REALM)])
