"""Alert digests: tell staff what needs a person, once, with the steps to fix it.

Modules, each with one job:

- `build`  — routing (check → staff category → recipients), windows (daily at
  `digest_time` in `digest_timezone`, plus immediate notices) and the content of one
  (recipient, window): counts, items grouped by check, remedy steps, repeats.
- `render` — Jinja2 templates (`worker/digest/templates/digest.*.j2`) → subject, text, HTML,
  the MIME message and the webhook's JSON body.
- `send`   — the once-per-(recipient, window) bookkeeping in `digests_sent`, SMTP and
  webhook delivery with retries, and `due()`, which the Celery tick fans out from;
  immediate notices due together are claimed and sent as one bundle.
- `cli`    — `oprecon digest [--preview] [--html FILE]` and `render_example()`.

Routing (`build.ROUTES`): front desk gets the chart/contact/Welcome work;
the practice manager gets privacy (`caregiver_link_stale`), portal-account problems
that need OP support, unreadable records, every escalated finding and the system
notices (breaker open, mass-change guard, dead-man's switch). A category with no
recipients falls back to the `default` category; with neither, nothing is sent for it
and a warning is logged once per process. One address in several categories gets one
digest covering all of them. The webhook (if set) receives every category, ids only.

Windows: one daily window per local date, closing at `digest_time` in
`digest_timezone` (key `daily:YYYY-MM-DD`); only the latest closed one is ever due, so
a worker that was down sends one catch-up digest, not one per missed day. Immediate
notices (key `immediate:<fingerprint|breaker|guard|deadman>:<when or run>`) go out on
the next tick, at most 5 minutes later, for high-severity findings (once per episode),
escalations, an open breaker, a staged mass-change batch and an overdue dead-man's
switch; events older than 24 h are left to the daily digest.

Bundles: staff must get a digest, not a flood, so the tick enqueues one delivery per
recipient for all of its waiting notices (named after the oldest), and that delivery
also gathers every other notice of the recipient without a row, plus any an earlier
attempt left `retrying`. It claims them all in one transaction, keys in sorted order
(PostgreSQL waits rather than deadlocks); a notice another worker holds is left out,
as is one whose problem cleared (it is `skipped` if claimed). The message counts the
problems by check at the top and in its subject; items of one check that share their
steps get them once, then one line each (`build.step_sets`), so a bundle grows by ids,
not by repeated steps; past `immediate_bundle_max_items` it only counts the rest and
says where to see them (`build.bundle_immediate`).
Every notice keeps its own row, so "once per recipient per notice" holds as before; a
bundle of one renders exactly like a single notice.

Names appear only with `digest_show_names`, on email only: they are read from the OP
source at send time for the ids the digest mentions (one streamed pass over patients
and contacts); if OP cannot be read, the digest goes out with ids.

Delivery semantics: *at most once*. The `digests_sent` row is inserted (status
`sending`) before anything is sent; the unique (practice, recipient, window_key)
constraint picks one winner among retries and racing workers. Outcomes: `sent`,
`empty` (nothing to say), `skipped` (an immediate notice whose problem cleared before
it went out), `retrying` (a transient error; the Celery retry takes the row over),
`failed` (permanent error, or retries used up), `unknown` (the connection broke after
the message was handed over, or a worker died mid-send: it may have arrived). A row
left in `sending` for `STALE_AFTER` (1 h, longer than the whole retry span) becomes
`unknown`, and a `retrying` row that old becomes `failed`; neither is resent. The next
daily digest says so at the top and, because only `sent`/`empty` rows count as "the
last digest", re-covers everything since the last one that certainly went out.
"""
