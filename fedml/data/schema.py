"""The canonical interactions table every source produces and every later step reads.

Columns (extra columns are allowed and carried along):

=========  ========  ==========================================================
column     dtype     meaning
=========  ========  ==========================================================
user_id    str       the shop's own shopper id
item_id    str       the shop's own product id
event      str       one of :data:`EVENT_TYPES`
rating     float64   explicit rating when ``event == "rating"``, else NaN
timestamp  int64     Unix seconds, UTC
=========  ========  ==========================================================
"""

from __future__ import annotations

USER = "user_id"
ITEM = "item_id"
EVENT = "event"
RATING = "rating"
TIMESTAMP = "timestamp"

REQUIRED_COLUMNS: tuple[str, ...] = (USER, ITEM, EVENT, RATING, TIMESTAMP)

#: Implicit events of a shop funnel, and "rating" for explicit feedback.
EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase", "favourite", "rating")

#: Largest Unix time (in seconds, either sign) a reader or validation accepts: beyond it a number is not a
#: time, and as nanoseconds it would overflow int64.
MAX_ABS_SECONDS = 1e15

#: Column added to quarantined rows: the expectation(s) each row failed.
QUARANTINE_REASON = "quarantine_reason"
