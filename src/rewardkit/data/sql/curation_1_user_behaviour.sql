-- Stage 1: per-account behaviour, and which accounts look like bots.
-- Inputs: events(user_id, image_id, event_type, ts_s), images(image_id, creator_id, posted_s)
-- (times as float seconds since the epoch, computed by the log normaliser).
-- Output: one row per account that acted on someone else's image, with its behaviour
-- signals and flagged (TRUE = suspected bot). Events on the account's own posts are left
-- out here: a self-remixing creator is handled by the self-remix rule, not as a bot.
WITH ev AS (
    SELECT e.user_id, e.image_id, e.event_type,
           e.ts_s,
           i.posted_s
    FROM events e
    JOIN images i ON e.image_id = i.image_id
    WHERE e.user_id <> i.creator_id
),
per_hour AS (
    SELECT user_id, MAX(n) AS max_events_per_hour
    FROM (
        SELECT user_id, FLOOR(ts_s / 3600) AS hour_bucket, COUNT(*) AS n
        FROM ev
        GROUP BY user_id, FLOOR(ts_s / 3600)
    ) h
    GROUP BY user_id
),
per_pair AS (
    SELECT user_id, image_id,
           MIN(CASE WHEN event_type = 'view' THEN ts_s END) AS first_view_s,
           MIN(CASE WHEN event_type = 'remix' THEN ts_s END) AS first_remix_s,
           SUM(CASE WHEN event_type = 'view' THEN 1 ELSE 0 END) AS views,
           SUM(CASE WHEN event_type = 'remix' THEN 1 ELSE 0 END) AS remixes,
           MIN(posted_s) AS posted_s
    FROM ev
    GROUP BY user_id, image_id
),
per_user AS (
    SELECT user_id,
           SUM(views) AS views,
           SUM(remixes) AS remixes,
           SUM(CASE WHEN remixes > 0
                     AND (first_view_s IS NULL OR first_view_s > first_remix_s)
                    THEN remixes ELSE 0 END) AS remixes_without_view,
           PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY first_remix_s - posted_s)
               AS median_post_to_remix_s
    FROM per_pair
    GROUP BY user_id
),
signals AS (
    SELECT u.user_id, u.views, u.remixes, u.remixes_without_view, u.median_post_to_remix_s,
           h.max_events_per_hour,
           CASE WHEN h.max_events_per_hour > ${max_events_per_hour} THEN 1 ELSE 0 END
           + CASE WHEN u.remixes > ${max_remix_per_view} * u.views THEN 1 ELSE 0 END
           + CASE WHEN u.remixes_without_view > ${max_remix_without_view_share} * u.remixes
                  THEN 1 ELSE 0 END
           + CASE WHEN u.median_post_to_remix_s < ${min_median_seconds_post_to_remix}
                  THEN 1 ELSE 0 END AS n_signals
    FROM per_user u
    JOIN per_hour h ON u.user_id = h.user_id
)
SELECT user_id, views, remixes, remixes_without_view, median_post_to_remix_s,
       max_events_per_hour, n_signals,
       (${enabled} = 1 AND remixes >= ${min_remixes} AND n_signals >= ${min_signals})
           AS flagged
FROM signals
