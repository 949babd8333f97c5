"""The per-test time limit of conftest.py: a test over it fails, a test under it passes."""

from pathlib import Path


def test_a_test_over_the_time_limit_fails(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner="""
        import time

        def test_slow():
            time.sleep(0.3)

        def test_fast():
            pass
    """)  # fmt: skip
    monkeypatch.setenv("SPARSEFIT_TEST_LIMIT_S", "0.2")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)  # the slow test's teardown report is the failure
    result.stdout.fnmatch_lines(["*test_slow took 0.* s, over the 0.2 s limit for one test*"])
