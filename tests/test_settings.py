"""Settings that were replaced keep a deployment working, and say what to set instead."""

from __future__ import annotations

import logging

import pytest

from streamrec.settings import Settings


def test_the_retired_session_count_is_taken_in_megabytes_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="streamrec.settings"):
        settings = Settings.from_env({"STREAMREC_SESSION_CACHE": "100000"})
    assert settings.session_cache_mb == pytest.approx(762.9, abs=0.1)  # 100,000 x 8 kB
    assert "STREAMREC_SESSION_CACHE_MB" in caplog.text and "retired" in caplog.text


def test_a_retired_count_of_zero_still_turns_the_cache_off() -> None:
    assert Settings.from_env({"STREAMREC_SESSION_CACHE": "0"}).session_cache_mb == 0


def test_the_megabytes_win_over_the_retired_count(caplog: pytest.LogCaptureFixture) -> None:
    env = {"STREAMREC_SESSION_CACHE": "100000", "STREAMREC_SESSION_CACHE_MB": "32"}
    with caplog.at_level(logging.WARNING, logger="streamrec.settings"):
        assert Settings.from_env(env).session_cache_mb == 32
    assert "ignored" in caplog.text


def test_a_retired_count_that_is_not_a_number_names_the_new_setting() -> None:
    with pytest.raises(ValueError, match="STREAMREC_SESSION_CACHE_MB"):
        Settings.from_env({"STREAMREC_SESSION_CACHE": "lots"})


@pytest.mark.parametrize("name", ["session_cache_mb", "exclusion_cache_mb", "online_user_cap"])
def test_a_negative_memory_setting_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be 0 or more"):
        Settings().replace(**{name: -1})
