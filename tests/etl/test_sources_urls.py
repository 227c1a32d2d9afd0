"""urls: the guarded downloader against a real HTTP server on 127.0.0.1, and the list parser."""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time

import pytest

import tests.etl.test_sources_folder as folder_tests
from etl.records import Rejected
from etl.sources.download import Downloader, address_problem
from etl.sources.urls import UrlSource, hash_split
from tests.etl.http_server import TestServer

GOOD = folder_tests.image_bytes(1)
FLAKY = folder_tests.image_bytes(2)
CAP = 200_000


@pytest.fixture(scope="module")
def server():
    with TestServer({"good": GOOD, "flaky": FLAKY}) as s:
        yield s


def downloader(**kw) -> Downloader:
    options = dict(timeout=0.5, retries=0, max_redirects=3, max_bytes=CAP, allow_private=True,
                   backoff=0.01)
    options.update(kw)
    return Downloader(**options)


def rejected(fetch, url) -> Rejected:
    with pytest.raises(Rejected) as info:
        fetch(url)
    return info.value


def test_good_image_and_relative_redirect(server):
    assert downloader().fetch(server.url("/img/good")) == GOOD
    assert downloader().fetch(server.url("/relative")) == GOOD
    assert downloader().fetch(server.url("/img/good", host="localhost")) == GOOD


def test_4xx_fails_at_once_5xx_is_retried_with_backoff(server):
    err = rejected(downloader(retries=3).fetch, server.url("/status/404"))
    assert (err.reason, err.detail) == ("download_error", "HTTP 404")
    assert server.hits["/status/404"] == 1
    start = time.monotonic()
    assert downloader(retries=2, backoff=0.05).fetch(server.url("/flaky/a/2")) == FLAKY
    assert time.monotonic() - start >= 0.05 + 0.1  # two waits, the second twice the first
    assert server.hits["/flaky/a/2"] == 3
    err = rejected(downloader(retries=1).fetch, server.url("/flaky/b/5"))
    assert (err.reason, err.detail) == ("download_error", "HTTP 500 after 1 retries")
    assert server.hits["/flaky/b/5"] == 2


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_timeout_bounds_each_attempt(server, path):
    start = time.monotonic()
    err = rejected(downloader(timeout=0.4, retries=1).fetch, server.url(path))
    elapsed = time.monotonic() - start
    assert err.reason == "download_error" and "timeout" in err.detail
    # Two attempts of ~0.4 s each; without the timeout they would take 2 x 2 s (sleep) or
    # 100 s (drip), so the bound leaves room for a loaded machine and still tells them apart.
    assert elapsed < 3.0


@pytest.mark.parametrize("mode", ["cl", "nocl"])
def test_byte_cap_with_and_without_content_length(server, mode):
    err = rejected(downloader().fetch, server.url(f"/big/{mode}/{CAP * 20}"))
    assert err.reason == "too_large"
    # Just under the cap is fine either way.
    assert len(downloader().fetch(server.url(f"/big/{mode}/{CAP}"))) == CAP


def test_lying_content_length(server):
    # Claims 1000 bytes, sends 20x the cap: never more than the declared bytes are read.
    assert downloader().fetch(server.url(f"/big/under/{CAP * 20}")) == b"\xab" * 1000
    # Claims more than it sends: an incomplete body is a failure, not a short image.
    err = rejected(downloader().fetch, server.url("/big/over/5000"))
    assert (err.reason, err.detail) == ("download_error",
                                        "incomplete body: 5000 of 50000 declared bytes")


def test_redirect_limit_and_schemes(server):
    assert downloader(max_redirects=3).fetch(server.url("/redirect/3")) == GOOD
    err = rejected(downloader(max_redirects=3).fetch, server.url("/redirect/4"))
    assert err.detail == "too many redirects (more than 3)"
    for scheme in ("ftp", "file", "gopher"):
        err = rejected(downloader().fetch, server.url(f"/to/{scheme}"))
        assert err.detail == f"scheme {scheme!r} not allowed (http/https only)"
    err = rejected(downloader().fetch, "file:///etc/passwd")
    assert err.reason == "download_error" and "'file'" in err.detail


def test_loopback_refused_unless_allowed(server):
    before = sum(server.hits.values())
    for host in ("127.0.0.1", "localhost"):
        err = rejected(downloader(allow_private=False).fetch, server.url("/img/good", host))
        assert err.reason == "download_error" and "loopback" in err.detail
        assert "allow_private_addresses" in err.detail
    assert sum(server.hits.values()) == before  # refused before any connection


@pytest.mark.parametrize("ip, problem", [
    ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"),
    ("169.254.169.254", "link-local"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("8.8.8.8", None),
    ("2606:4700::1111", None),
])
def test_address_policy(ip, problem):
    got = address_problem(ipaddress.ip_address(ip))
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1, made by the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_https_checks_the_certificate_against_the_host_name(certificate):
    cert, _ = certificate
    with TestServer({"good": GOOD}, tls=certificate) as tls_server:
        # Connected to the checked address, but SNI and verification use the URL's name.
        url = tls_server.url("/img/good", host="localhost")
        assert downloader(cafile=cert).fetch(url) == GOOD
        err = rejected(downloader().fetch, url)  # not in the system's trust store
        assert err.reason == "download_error" and "CERTIFICATE_VERIFY_FAILED" in err.detail


def test_list_parsing_records_and_downloads(server, tmp_path):
    lines = [
        "# a comment", "",
        f"n01\t{server.url('/img/good')}",
        f"n02\t{server.url('/img/good?copy=2')}\tvalidation",
        f"n02\t{server.url('/status/404')}\ttrain",
        "n01 no tab here",
        f"n01\t{server.url('/img/good')}",            # duplicate of line 3
        f"n03\t{server.url('/img/good?x=3')}\tsomewhere",
        "n01\tftp://example.org/a.jpg",
        f"bad/label\t{server.url('/img/good?x=4')}",
    ]
    path = tmp_path / "urls.tsv"
    path.write_text("\n".join(lines) + "\n")
    source = UrlSource(str(path), downloader(), seed=3, validation_fraction=0.5)
    assert [c.synset for c in source.classes()] == ["n01", "n02"]
    got = folder_tests.drain(source)
    assert len(got) == 8  # every non-blank, non-comment line is one record
    ok = {r.source: (r.split, r.label, p) for r, p in got.values() if isinstance(p, bytes)}
    assert ok == {
        server.url("/img/good"): (hash_split(server.url("/img/good"), 3, 0.5), 0, GOOD),
        server.url("/img/good?copy=2"): ("validation", 1, GOOD)}
    failed = [(r.split, p.detail) for r, p in got.values() if isinstance(p, Rejected)]
    assert failed == [("train", "HTTP 404")]
    rejects = sorted((r.reject[0], r.reject[1].split(":")[0]) for r, _ in got.values() if r.reject)
    assert rejects == [("download_error", "line 9"), ("error", "line 10"), ("error", "line 6"),
                       ("error", "line 7"), ("error", "line 8")]


def test_split_is_stable_and_follows_the_fraction(tmp_path):
    urls = [f"http://example.org/{i}.jpg" for i in range(2000)]
    splits = [hash_split(u, 0, 0.2) for u in urls]
    assert splits == [hash_split(u, 0, 0.2) for u in urls]
    assert 0.16 < splits.count("validation") / len(urls) < 0.24
    assert splits != [hash_split(u, 1, 0.2) for u in urls]


def test_synsets_file_and_structural_errors(tmp_path, server):
    path = tmp_path / "urls.tsv"
    path.write_text(f"n01\t{server.url('/img/good')}\nn09\t{server.url('/img/good?9')}\n")
    (tmp_path / "s.txt").write_text("n01\nn02\n")
    (tmp_path / "w.txt").write_text("n01\tfirst class\n")
    source = UrlSource(str(path), downloader(), synsets_file=str(tmp_path / "s.txt"),
                       synset_words_file=str(tmp_path / "w.txt"))
    assert [(c.synset, c.name) for c in source.classes()] == [("n01", "first class"),
                                                              ("n02", "n02")]
    got = folder_tests.drain(source)
    assert sorted(r.reject[0] for r, _ in got.values() if r.reject) == ["no_label"]
    with pytest.raises(ValueError, match="--input: .*missing.tsv"):
        UrlSource(str(tmp_path / "missing.tsv"), downloader())
    (tmp_path / "empty.tsv").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no valid"):
        UrlSource(str(tmp_path / "empty.tsv"), downloader())
