"""The 429 regression of wave 2, as pure functions of the limiter's state and an injected clock.

A server enforcing 3,000 RPM may hold only one second's worth (50 requests) while its headers say
``limit: 3000`` (Anthropic: "a rate of 60 requests per minute (RPM) might be enforced as 1 request per
second"). These tests drive :class:`~llmap.control.limits.RateLimiter` against such a server, modelled
by the simulator's own bucket (:mod:`llmap.sim.limits`) on the same fake clock, and count what the
server would refuse. Each scenario over-sent before the fix (wave 2): the first second after the lane
waited for its first answer, the burst after a learned limit, the drift a ``remaining`` could not
correct, and the burst after a ``Retry-After`` pause.
"""

from __future__ import annotations

import pytest

from llmap.control.headers import parse_rate_limit_headers
from llmap.control.limits import RateLimiter
from llmap.sim.limits import RateLimiter as ServerLimiter
from llmap.sim.limits import ratelimit_headers

RPM = 3000  # 50 requests a second
WALL = 1_722_513_600.0  # 2024-08-01T12:00:00Z: the wall clock at fake time 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


#: A request reaches the server this long after the client admitted it, seconds.
ARRIVAL_S = 1e-4


class Server:
    """The simulator's limiter with 1 s of burst: admits or refuses, and says so in headers.
    Requests arrive :data:`ARRIVAL_S` after the client's clock reads them sent."""

    def __init__(self, clock: Clock, style: str = "openai") -> None:
        self.clock = lambda: clock() + ARRIVAL_S
        self.limiter = ServerLimiter(rpm=RPM, clock=self.clock, burst_s=1.0)
        self.style = style
        self.refused = 0
        self.admitted = 0

    def handle(self) -> dict[str, str]:
        admission = self.limiter.admit(0)
        if admission.allowed:
            self.admitted += 1
        else:
            self.refused += 1
        return ratelimit_headers(admission, self.style, wall_now=WALL + self.clock())


def send_what_is_admitted(client: RateLimiter, server: Server, clock: Clock, *, until: float,
                          latency: float = 0.0, limit: int | None = None, step: float = 0.001) -> int:
    """Send every request the client admits until ``until`` (clock seconds), one step at a time.

    Each request reaches the server at once; its headers come back ``latency`` seconds later and are
    applied with its admission time as ``sent_at``. At most ``limit`` requests are in flight.
    Returns how many were sent.
    """
    inbox: list[tuple[float, float, dict[str, str]]] = []  # (due, sent_at, headers)
    sent = 0
    while clock.now < until - 1e-12:
        now = clock.now
        for item in [i for i in inbox if i[0] <= now + 1e-12]:
            inbox.remove(item)
            client.update_from_headers(item[2], now, sent_at=item[1], wall_now=WALL + now)
        while (limit is None or len(inbox) < limit) and client.reserve(0, now) == 0:
            inbox.append((now + latency, now, server.handle()))
            sent += 1
        clock.now = round(now + step, 9)
    return sent


def test_told_limits_the_first_second_never_over_sends_however_late_the_first_request():
    """The lane's limiter is made, then the job takes 2 s to send its first request: wave 2 had
    accrued 3 s' worth (150) and sent it at once; the server held 50."""
    clock = Clock()
    client, server = RateLimiter(rpm=RPM, now=0.0), Server(clock)
    clock.now = 2.0
    send_what_is_admitted(client, server, clock, until=3.0)
    assert server.refused == 0
    assert server.admitted >= 85  # 50 at once, then the refill after one arrival slack (0.25 s)


def test_told_limits_after_the_first_answer_alone():
    """The provider is discovering its dialect, so one request goes first; its answer took 0.97 s.
    Wave 2's bucket had refilled 48 more by then (it held the whole minute): 97 went at once."""
    clock = Clock()
    client, server = RateLimiter(rpm=RPM, now=0.0), Server(clock)
    assert client.reserve(0, 0.0) == 0.0
    first = server.handle()
    clock.now = 0.97
    client.update_from_headers(first, 0.97, sent_at=0.0, wall_now=WALL + 0.97)
    send_what_is_admitted(client, server, clock, until=2.0, latency=0.5)
    assert server.refused == 0


@pytest.mark.parametrize("style", ["openai", "anthropic"])
def test_learned_limits_burst_no_more_than_the_server_said_remains(style):
    """Nothing told: the first answer says limit 3000, remaining 49. Wave 2 credited the 1 s wait
    (remaining refilled at 50/s since the request was sent, capped at 3000): 99 went at once."""
    clock = Clock()
    client, server = RateLimiter(now=0.0), Server(clock, style)
    assert client.reserve(0, 0.0) == 0.0 and not client.limited
    first = server.handle()
    clock.now = 1.0
    client.update_from_headers(first, 1.0, sent_at=0.0, wall_now=WALL + 1.0)
    assert client.limited
    sent = send_what_is_admitted(client, server, clock, until=1.001)
    assert sent <= 50
    send_what_is_admitted(client, server, clock, until=3.0, latency=0.1)
    assert server.refused == 0


def test_remaining_corrects_a_client_ahead_of_the_server():
    """Another process of the same key took 30 of the server's 50: our client believes it has 50.
    Its request at t = 1.0 is answered at 1.1 with remaining 19; 5 more went out meanwhile. The
    server now holds 19 + 5 refilled - 5 sent = 19. Wave 2 compared 19 + 5 with its own level,
    without the 5 sent since, kept 24 and over-sent 5."""
    clock = Clock()
    client, server = RateLimiter(rpm=RPM, now=0.0), Server(clock)
    clock.now = 1.0
    for _ in range(30):  # the other process
        server.handle()
    assert client.reserve(0, 1.0) == 0.0
    header = server.handle()  # remaining 19, as of 1.0
    for k in range(1, 6):  # 5 more, every 20 ms, before its answer comes
        clock.now = 1.0 + 0.02 * k
        assert client.reserve(0, clock.now) == 0.0
        server.handle()
    clock.now = 1.1
    client.update_from_headers(header, 1.1, sent_at=1.0)
    assert client.requests.available(1.1) == pytest.approx(server.limiter.requests.level())  # 19, not 24
    send_what_is_admitted(client, server, clock, until=2.0)
    assert server.refused == 0


def test_after_a_retry_after_pause_the_burst_is_what_the_server_holds():
    """A 429's Retry-After paused the lane for 1 s: the server filled up to 50, not more. Wave 2's
    bucket, holding the whole minute, had refilled 50 past its level and sent that at once."""
    clock = Clock()
    client, server = RateLimiter(rpm=RPM, now=0.0), Server(clock)
    send_what_is_admitted(client, server, clock, until=1.0, latency=0.05)
    assert server.refused == 0
    client.requests.refund(5, 1.0)  # a few refunded reservations: the client is ahead by 5
    client.pause_until(2.0)
    clock.now = 2.0
    sent = send_what_is_admitted(client, server, clock, until=2.001)
    assert 0 < sent <= 50
    assert server.refused == 0


def test_anthropic_resets_are_read_from_when_the_request_was_sent():
    """An RFC 3339 reset is an instant: read against the answer's arrival it loses the latency
    (here 0.8 s), against the request's admission it does not."""
    sent_wall = WALL + 10.2
    headers = {"anthropic-ratelimit-requests-limit": "3000", "anthropic-ratelimit-requests-remaining": "49",
               "anthropic-ratelimit-requests-reset": "2024-08-01T12:00:11Z"}
    info = parse_rate_limit_headers(headers, wall_now=sent_wall + 0.8, reset_from=sent_wall)
    assert info.requests.reset_s == pytest.approx(0.8)
    assert parse_rate_limit_headers(headers, wall_now=sent_wall + 0.8).requests.reset_s == 0.0
    limiter = RateLimiter(now=0.0)
    limiter.update_from_headers(headers, 11.0, sent_at=10.2, wall_now=sent_wall + 0.8)
    assert limiter.requests.server_reset_at == pytest.approx(11.0)
