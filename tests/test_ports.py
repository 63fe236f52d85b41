"""The test servers' port picker never hands out one port twice in a process (servers bind
seconds after the pick; the OS may offer the same free port again meanwhile)."""

from __future__ import annotations

from tests import ports


class _OfferedPort:
    """A socket whose bind(("127.0.0.1", 0)) gets the next port the fake OS offers."""

    offers: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        self.port = self.offers.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_a_port_the_os_offers_again_is_skipped(monkeypatch):
    monkeypatch.setattr(ports, "_HANDED_OUT", set())
    monkeypatch.setattr(ports.socket, "socket", _OfferedPort)
    monkeypatch.setattr(_OfferedPort, "offers", [41000, 41000, 41000, 41001])
    assert ports.free_port() == 41000
    assert ports.free_port() == 41001  # 41000 offered twice more, skipped both times
    assert _OfferedPort.offers == []


def test_many_picks_are_distinct_real_ports():
    picked = [ports.free_port() for _ in range(50)]
    assert len(set(picked)) == 50 and all(1024 <= p < 65536 for p in picked)
