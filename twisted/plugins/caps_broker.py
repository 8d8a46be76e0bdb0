from twisted.application.service import ServiceMaker

capsBroker = ServiceMaker(
    "CAPS broker",
    "caps.tap",
    "The CAPS delivery-tracking queue broker (newline-delimited JSON over TCP).",
    "caps-broker",
)
