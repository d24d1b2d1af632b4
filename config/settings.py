"""One typed settings object for every process.

Values come from `OPRECON_*` environment variables (nested with `__`, e.g.
`OPRECON_POLICIES__WELCOME_NOT_SENT=alert`), then an optional TOML file named by
`OPRECON_CONFIG_FILE`, then the defaults here. A bad value stops start-up with one line
that names the setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta, tzinfo
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Policy(StrEnum):
    OFF = "off"
    ALERT = "alert"
    FIX = "fix"


class SettingsError(RuntimeError):
    """An invalid setting; `str()` is one line naming it."""


DEFAULT_VAR = Path("var")
# OPRECON_* variables read elsewhere than by Settings.
_OTHER_ENV = frozenset({"OPRECON_CONFIG_FILE"})
_DEV_ENV = ("OPRECON_TEST_", "OPRECON_BENCH_")  # the test suite's and the benchmark's


def _clear_text(url: str) -> bool:
    """A plain-http URL to another machine (loopback never leaves this one: the
    simulator, an SSH tunnel or a local TLS-terminating proxy)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    loopback = host == "localhost" or host == "::1" or host.startswith("127.")
    return parts.scheme.lower() == "http" and not loopback


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPRECON_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # -- infrastructure ---------------------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Locks, rate-limit buckets, breaker state: kept apart from the broker's keys.
    redis_url: str = "redis://127.0.0.1:6379/1"
    state_db_url: str = f"sqlite:///{DEFAULT_VAR / 'oprecon.sqlite'}"
    practice: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    heartbeat_dir: Path = DEFAULT_VAR / "heartbeat"
    # Worker and beat write a heartbeat this often; one older than 3x is stale.
    heartbeat_interval_seconds: float = Field(10, gt=0, le=300)
    metrics_port: int = Field(9808, ge=0, le=65535)  # 0 disables the metrics server

    # -- sources ----------------------------------------------------------------------
    op_source: Literal["csv", "sql"] = "csv"
    op_dir: Path | None = None
    op_db_url: str | None = None
    portal_source: Literal["csv", "http"] = "csv"
    portal_dir: Path | None = None
    portal_url: str | None = None
    portal_token: SecretStr | None = None
    portal_timeout_seconds: float = Field(10.0, gt=0, le=120)
    portal_max_retries: int = Field(3, ge=0, le=10)
    # Dotted path to a class implementing PortalReader/PortalWriter, for another vendor.
    portal_adapter: str | None = None

    # -- input oprecon did not write (docs/reliability.md) ----------------------------
    # The zone of OP times written without a UTC offset, e.g. "America/New_York";
    # unset, such a time is an invalid_record (read as UTC it could hide a fresh change).
    op_timezone: str | None = None
    # Above this share of unreadable rows a file gets one alert and no fixes are planned.
    unreadable_alert_percent: float = Field(1.0, ge=0, le=100)
    # Below this many unreadable rows the share does not apply (small files).
    unreadable_alert_min_rows: int = Field(10, ge=0)
    csv_max_field_chars: int = Field(1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    csv_max_line_chars: int = Field(4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # Portal HTTP: decompressed bytes per response, seconds per whole request (all
    # reads included), pages per listing.
    portal_max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    portal_request_deadline_seconds: float = Field(60.0, gt=0, le=3600)
    portal_max_pages: int = Field(10_000, ge=1)
    # A plain-http portal URL sends the token in clear text: refused unless set.
    allow_unsafe_plain_http: bool = False
    # A propagation delay under 15 minutes compares records the portal has not caught
    # up with (false alarms, fixes on stale data): refused unless set.
    allow_unsafe_propagation_delay: bool = False

    # -- time rules -------------------------------------------------------------------
    propagation_delay_minutes: float = Field(15, ge=0)
    hold_minutes: float = Field(15, ge=0)
    source_refresh_hold_minutes: float = Field(20, ge=0)
    verify_max_retries: int = Field(2, ge=0, le=10)
    welcome_window_days: float = Field(7, gt=0)
    # contact_duplicate: the match probability (Fellegi-Sunter, learned from the practice's
    # own contacts) a pair needs before the household rules look at it.
    duplicate_match_threshold: float = Field(0.9, gt=0, lt=1)

    # -- policy and safety ------------------------------------------------------------
    dry_run: bool = False
    policies: dict[str, Policy] = Field(default_factory=dict)
    mass_change_max_fixes: int = Field(50, ge=0)
    mass_change_max_percent: float = Field(2.0, ge=0, le=100)
    # Below this many fixes the percentage limit does not apply (small practices).
    mass_change_min_fixes: int = Field(10, ge=0)
    allow_unguarded_fixes: bool = False
    portal_rate_per_second: float = Field(5.0, gt=0)
    # Portal reads (list pages, targeted selects, one-user reads) share their own bucket,
    # across every worker process, so an on-call burst cannot hammer the portal.
    portal_read_rate_per_second: float = Field(200.0, gt=0)
    breaker_failure_ratio: float = Field(0.5, gt=0, le=1)
    breaker_min_calls: int = Field(10, ge=1)
    breaker_cooldown_seconds: float = Field(300, gt=0)
    breaker_window_seconds: float = Field(120, gt=0)
    # Transient failures before a fix is given up and handed to staff as failed.
    fix_max_attempts: int = Field(8, ge=1, le=50)
    # A fix is claimed for this long before its portal call (worker.fixes.claims); the
    # fix task's time limits stay inside it, and the resume tick (every 15 s) takes back
    # a claim whose worker died once it has lapsed: within a minute by default.
    fix_lease_seconds: int = Field(45, ge=10, le=3600)

    # -- digests ----------------------------------------------------------------------
    digest_recipients: dict[str, list[str]] = Field(default_factory=dict)
    digest_time: str = Field("07:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    digest_timezone: str = "America/New_York"
    digest_show_names: bool = False
    # Immediate notices due together go out as one message per recipient; beyond this
    # many problems it lists no more and counts the rest by check.
    immediate_bundle_max_items: int = Field(50, ge=1, le=1000)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_starttls: bool = False
    # Implicit TLS from the first byte (port 465) instead of upgrading with STARTTLS.
    smtp_ssl: bool = False
    # CA bundle to verify the relay's certificate (an internal CA); default: the system's.
    smtp_ca_file: Path | None = None
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_sender: str = "oprecon@localhost"
    webhook_url: str | None = None

    # -- staff console (`oprecon web`) -------------------------------------------------
    # Digest items link to {web_base_url}/families/{patient_id} when set (ids only).
    web_base_url: str | None = Field(None, pattern=r"^https?://[^\s?#]+$")
    # Signs session cookies; unset, one is generated once and kept in the state database.
    web_secret_key: SecretStr | None = None
    web_session_idle_minutes: float = Field(30, gt=0, le=24 * 60)
    # Show patient and contact names on console pages (behind the login); ids otherwise.
    web_show_names: bool = False
    # Failed logins for one user name before each further try must wait (doubling).
    web_login_free_failures: int = Field(3, ge=1, le=20)

    # -- scheduling -------------------------------------------------------------------
    incremental_scan_minutes: float = Field(5, gt=0)
    full_scan_hour: int = Field(2, ge=0, le=23)
    # >1: the nightly full scan runs as this many shard tasks (worker.scan.shards).
    full_scan_shards: int = Field(1, ge=1, le=64)
    # A nightly full scan that found the lock held is retried by every scheduled scan
    # until it runs; staff are alerted when it has not run this long after the first try
    # (worker.runtime.deferral).
    full_scan_deadline_hours: float = Field(4, gt=0, le=24)
    # A full scan of 100,000 patients takes ~10 s (docs/benchmarks.md): 15 minutes is
    # ample, and keeps the visibility timeout, after which the broker hands a dead
    # worker's message to another, at 30 minutes (docs/operations.md, "Time limits").
    scan_soft_limit_seconds: int = Field(840, gt=0)
    scan_hard_limit_seconds: int = Field(900, gt=0)
    broker_visibility_timeout_seconds: int = Field(1800, gt=0)
    # How long the scan lock outlives the hard limit (the lock is hard + this): time for
    # a killed scan's child to be gone before another scan may start.
    scan_lock_slack_seconds: int = Field(60, ge=1, le=3600)
    # RedBeat's lock: a standby beat takes over this long after the active one dies.
    beat_lock_timeout_seconds: int = Field(300, ge=5, le=3600)
    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    @field_validator("policies", mode="before")
    @classmethod
    def _known_checks(cls, value: Any) -> Any:
        from worker.checks.catalog import CHECK_IDS

        if isinstance(value, dict):
            unknown = sorted(set(value) - set(CHECK_IDS))
            if unknown:
                raise ValueError(f"unknown check id(s): {', '.join(unknown)}")
        return value

    @field_validator("digest_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        """An IANA zone name; checked now, not at the first digest hours later."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name such as America/New_York)"
            ) from None
        return value

    @field_validator("digest_recipients")
    @classmethod
    def _recipients(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        """Known categories and addresses that can receive mail (no deliverability
        lookup): a typo must stop start-up, not lose a day's digest."""
        from email_validator import EmailNotValidError, validate_email

        known = ("front_desk", "practice_manager", "default")
        for category, addresses in value.items():
            if category not in known:
                raise ValueError(f"unknown category {category!r} (one of {', '.join(known)})")
            for n, address in enumerate(addresses, 1):
                try:
                    validate_email(address.strip(), check_deliverability=False)
                except EmailNotValidError as err:
                    if "special-use" in str(err):
                        continue  # example.invalid, a .test relay: reserved, not malformed
                    raise ValueError(f"{category} address #{n} is not an email address: "
                                     f"{err}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.scan_soft_limit_seconds < self.scan_hard_limit_seconds:
            raise ValueError("scan_soft_limit_seconds must be below scan_hard_limit_seconds")
        if self.scan_hard_limit_seconds * 2 > self.broker_visibility_timeout_seconds:
            raise ValueError(
                "broker_visibility_timeout_seconds must be at least twice scan_hard_limit_seconds"
            )
        if self.lock_timeout_seconds >= self.broker_visibility_timeout_seconds:
            raise ValueError(  # soft < hard < lock < visibility: docs/operations.md
                "broker_visibility_timeout_seconds must exceed the scan lock "
                f"({self.lock_timeout_seconds} s = scan_hard_limit_seconds + "
                "scan_lock_slack_seconds)"
            )
        if self.propagation_delay_minutes < 15 and not self.allow_unsafe_propagation_delay:
            raise ValueError(
                "propagation_delay_minutes under 15 (the portal takes 15 minutes or more to "
                "show a change) needs allow_unsafe_propagation_delay=true"
            )
        if self.op_timezone is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.op_timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"op_timezone {self.op_timezone!r} is not a time zone name "
                    "(e.g. America/New_York)") from None
        if (self.portal_source == "http" and self.portal_url and self.portal_token
                and _clear_text(self.portal_url) and not self.allow_unsafe_plain_http):
            raise ValueError(
                "portal_url is plain http: the token would travel in clear text "
                "(use https, or set allow_unsafe_plain_http=true)"
            )
        unguarded = self.mass_change_max_fixes == 0 and self.mass_change_max_percent == 0
        fixing = any(p is Policy.FIX for p in self.policies.values())
        if unguarded and fixing and not self.allow_unguarded_fixes:
            raise ValueError(
                "fix policies with the mass-change guard off need allow_unguarded_fixes=true"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = os.environ.get("OPRECON_CONFIG_FILE")
        if toml_file and not Path(toml_file).is_file():
            # A mistyped path must not silently fall back to the defaults.
            raise SettingsError(f"invalid setting OPRECON_CONFIG_FILE: no file at {toml_file}")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        sources.append(file_secret_settings)
        return tuple(sources)

    # -- derived ----------------------------------------------------------------------

    @property
    def propagation_delay(self) -> timedelta:
        return timedelta(minutes=self.propagation_delay_minutes)

    @property
    def op_zone(self) -> tzinfo | None:
        """op_timezone as a zone, or None."""
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.op_timezone) if self.op_timezone else None

    @property
    def hold(self) -> timedelta:
        return timedelta(minutes=self.hold_minutes)

    @property
    def source_refresh_hold(self) -> timedelta:
        return timedelta(minutes=self.source_refresh_hold_minutes)

    @property
    def welcome_window(self) -> timedelta:
        return timedelta(days=self.welcome_window_days)

    @property
    def fix_lease(self) -> timedelta:
        return timedelta(seconds=self.fix_lease_seconds)

    @property
    def fix_time_limits(self) -> tuple[int, int]:
        """(soft, hard) for the fix task: a live worker finishes (or is stopped) before
        its claim lapses, so a lapsed claim always means a dead or stuck worker."""
        hard = max(2, self.fix_lease_seconds * 4 // 5)
        return max(1, hard - max(1, hard // 5)), hard

    @property
    def lock_timeout_seconds(self) -> int:
        """The scan lock outlives the hard limit, and stays below the visibility timeout."""
        return self.scan_hard_limit_seconds + self.scan_lock_slack_seconds

    def policy_for(self, check: str, default: Policy) -> Policy:
        return self.policies.get(check, default)


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "settings"
    name = f"OPRECON_{loc.upper().replace('.', '__')}" if first["loc"] else "settings"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid setting {name}: {msg}{more}{_misplaced_hint(err)}"


def _misplaced_hint(err: ValidationError) -> str:
    """A top-level setting written below a [table] of the TOML file belongs to that table
    (TOML's rule): name it, so `smtp_host` under [digest_recipients] is not a mystery."""
    for e in err.errors():
        loc = e["loc"]
        if len(loc) >= 2 and loc[0] in ("digest_recipients", "policies") and isinstance(
                loc[1], str) and loc[1] in Settings.model_fields:
            return (f"; '{loc[1]}' is a top-level setting read inside [{loc[0]}]: in the "
                    f"settings file, move it above the first [table]")
        if e["type"] == "value_error" and loc and loc[0] == "digest_recipients":
            for key in Settings.model_fields:
                if f"'{key}'" in e["msg"]:
                    return (f"; '{key}' is a top-level setting read inside [{loc[0]}]: in "
                            "the settings file, move it above the first [table]")
    return ""


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """OPRECON_* variables no setting reads: typos, like an unknown TOML key (which
    fails), but reported rather than refused (a shell may export them for scripts)."""
    environ = os.environ if environ is None else environ
    known = {f"OPRECON_{name.upper()}" for name in Settings.model_fields}
    # Read outside Settings: the config file, the tests' services, the console's secret.
    known |= _OTHER_ENV
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("OPRECON_") or upper in known or upper.startswith(_DEV_ENV):
            continue
        if upper.split("__", 1)[0] in known and "__" in upper:
            continue  # nested: OPRECON_POLICIES__WELCOME_NOT_SENT
        out.append(name)
    return out


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning pydantic's report into one line that names the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise SettingsError(_one_line(err)) from None
    except (OSError, ValueError) as err:  # unreadable or malformed TOML file
        raise SettingsError(f"invalid settings file: {err}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
