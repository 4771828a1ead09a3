from .proxyproc import ProxyProcess


def test_psql_through_proxy(proxy: ProxyProcess) -> None:
    out = proxy.psql("-At", "-c", "select 1+1", "-c", "select extname from pg_extension where extname='vector'")
    assert out.stdout.split() == ["2", "vector"]
