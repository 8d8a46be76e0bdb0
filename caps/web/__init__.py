"""
The broker's web side, served by twisted.web in the broker's process
(C{twistd caps-broker --web ENDPOINT}): the operator's page, each
retailer's page, a JSON API with live updates by server-sent events, and
the metrics.
"""

from caps.web.site import make_site

__all__ = ["make_site"]
