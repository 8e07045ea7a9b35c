"""Fuzz tests (hypothesis, bounded) of the source parser, its display form and the address fence.

Whatever string a spec or a job names as a source: parsing it either succeeds or raises a
SourceError (never anything else), and neither the error nor the shown form holds a credential
placed in the URL's user info, query or fragment. Any address in an internal range is refused.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provision.errors import SourceError
from provision.fetch.netguard import AddressGuard, AddressRefused, refused_rule
from provision.fetch.sources import parse_source, shown_source

BOUNDED = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SECRET = "S3CRETtok9Zq"

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
schemes = st.sampled_from(["http", "https", "HTTP", "ftp", "hf", "civitai", "file", "", "h t", "https:"])
hosts = st.one_of(st.sampled_from(["", "example.com", "127.0.0.1", "[::1]", "[::1", "h:99999", "h:0", "h:x",
                                   "xn--nxasmq6b.com", "a@b"]), text)


@st.composite
def sources_with_a_secret(draw: st.DrawFn) -> str:
    """A URL-like string with the secret where credentials live: user info, a query value, a fragment."""
    where = draw(st.sampled_from(["user", "password", "query", "query-bare", "fragment"]))
    user = {"user": f"{SECRET}@", "password": f"me:{SECRET}@"}.get(where, draw(st.sampled_from(["", "u@", "u:p@"])))
    name = draw(st.sampled_from(["token", "access", "X-Amz-Signature", "sig", "q", ""]))
    query = {"query": f"?a=1&{name}={SECRET}",
             "query-bare": f"?{SECRET}"}.get(where, draw(st.sampled_from(["", "?x=1"])))
    fragment = f"#{SECRET}" if where == "fragment" else ""
    sep = draw(st.sampled_from(["://", ":/", "//", ":"]))
    return f"{draw(schemes)}{sep}{user}{draw(hosts)}/{draw(text)}{query}{fragment}"


@BOUNDED
@given(sources_with_a_secret())
def test_no_source_crashes_the_parser_or_shows_its_secret(source: str) -> None:
    shown = shown_source(source)
    assert SECRET not in shown, (source, shown)
    try:
        parse_source(source)
    except SourceError as exc:
        message = exc.one_line()
        assert SECRET not in message and "\n" not in message, (source, message)


@BOUNDED
@given(text)
def test_any_text_parses_or_is_a_source_error(source: str) -> None:
    try:
        parse_source(source)
    except SourceError as exc:
        assert "\n" not in exc.one_line()
    shown_source(source)


INTERNAL = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "0.0.0.0/8",
            "224.0.0.0/4", "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10", "::ffff:127.0.0.0/104", "ff00::/8"]


@BOUNDED
@given(st.sampled_from(INTERNAL).flatmap(lambda net: st.ip_addresses(network=net)), st.integers(1, 65535))
def test_every_internal_address_is_refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                           port: int) -> None:
    guard = AddressGuard.for_url("https://models.example.com/x")
    assert refused_rule(str(address)) is not None
    with pytest.raises(AddressRefused):
        guard.check("models.example.com", port, str(address))


def test_credentials_before_an_hf_repository_id_are_not_echoed() -> None:
    """Found by the fuzz above: the repository-id check quoted 'TOKEN@' back."""
    for source in (f"hf://{SECRET}@/0/0", f"hf://me:{SECRET}@owner/x/0"):
        try:
            parse_source(source)
        except SourceError as exc:
            assert SECRET not in exc.one_line(), exc.one_line()
        else:
            raise AssertionError(f"{source} parsed")
