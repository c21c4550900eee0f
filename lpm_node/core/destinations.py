"""Where the node's results go: a destination ``AET@HOST:PORT`` parsed once into a :class:`Destination`.

Configured destinations are parsed when the settings are read (``DestinationSetting``); the outbox stores each
as its text (``str(destination)``) and reads it back with :meth:`Destination.parse`, the one parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainSerializer, PlainValidator

if TYPE_CHECKING:
    from lpm_node.core.config import Settings


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives the node's results."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT``; a ValueError says what the form is."""
        try:
            ae_title, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            return cls(ae_title=ae_title.strip(), host=host.strip(), port=int(port))
        except ValueError as exc:
            raise ValueError(f"destination {text!r} is not of the form AET@HOST:PORT") from exc

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _destination_setting(value: Any) -> Destination:
    if isinstance(value, Destination):
        return value
    if not isinstance(value, str):
        raise ValueError(f"destination {value!r} is not a text of the form AET@HOST:PORT")
    return Destination.parse(value)


# A configured destination: the text "AET@HOST:PORT" in the file, a Destination once read.
DestinationSetting = Annotated[Destination, PlainValidator(_destination_setting), PlainSerializer(str)]


def result_destinations(settings: Settings, *, calling_ae: str = "", calling_address: str = "") -> list[Destination]:
    """The configured destinations, plus the sender of the CT (at ``reply_port``) when ``reply_to_sender``."""
    found = list(settings.destinations)
    if settings.output.reply_to_sender and calling_ae and calling_address:
        found.append(Destination(calling_ae.strip(), calling_address, settings.output.reply_port))
    unique: dict[str, Destination] = {}
    for dest in found:
        unique.setdefault(str(dest), dest)
    return list(unique.values())
