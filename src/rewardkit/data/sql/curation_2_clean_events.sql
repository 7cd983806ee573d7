-- Stage 2: drop the events of suspected bots and, optionally, creators' events on their
-- own posts (self-views and self-remixes), then collapse to one row per (image, user).
-- Inputs: events, images, bots(user_id). Output: image_id, user_id, the kept view and remix
-- event counts, plus per-stage event counts (kept_* flags) for the dataset card.
WITH tagged AS (
    SELECT e.image_id, e.user_id, e.event_type,
           CASE WHEN b.user_id IS NULL THEN 1 ELSE 0 END AS not_bot,
           CASE WHEN ${exclude_self} = 1 AND e.user_id = i.creator_id THEN 0 ELSE 1 END
               AS not_self
    FROM events e
    JOIN images i ON e.image_id = i.image_id
    LEFT JOIN bots b ON e.user_id = b.user_id
)
SELECT image_id, user_id, not_bot, not_self,
       COUNT(*) AS events,
       SUM(CASE WHEN event_type = 'view' THEN 1 ELSE 0 END) AS views,
       SUM(CASE WHEN event_type = 'remix' THEN 1 ELSE 0 END) AS remixes
FROM tagged
GROUP BY image_id, user_id, not_bot, not_self
