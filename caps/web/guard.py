"""
HTTP basic authentication for the web site, through twisted.cred's guard:
the broker's own checkers, and a realm that gives each logged-in client
the resource tree its permissions allow.
"""

from twisted.cred.portal import IRealm, Portal
from twisted.web.guard import BasicCredentialFactory, HTTPAuthSessionWrapper
from twisted.web.resource import IResource
from zope.interface import implementer

from caps.auth import IClient

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


def guarded(portal, tree):
    """
    A resource asking for HTTP basic authentication (realm C{CAPS}) with
    the checkers of C{portal}, then serving C{tree(permissions)}.
    """
    checkers = list(dict.fromkeys(portal.checkers.values()))
    web = Portal(WebRealm(portal.realm, tree), checkers)
    return HTTPAuthSessionWrapper(web, [BasicCredentialFactory(REALM)])
