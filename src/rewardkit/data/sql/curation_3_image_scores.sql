-- Stage 3: one score per image from the kept events.
-- exposure = views (distinct viewers when distinct_users = 1), remixes likewise; the score
-- is remixes per view with prior_views pseudo-views at the global rate (signal remix_rate)
-- or the raw remix count (signal remix_count). top_creator_remixers counts remixers whose
-- follower_count reaches the top-creator threshold (the creator signal).
-- Inputs: image_user (stage 2, kept rows), images, top_creators(user_id).
WITH kept AS (
    SELECT * FROM image_user WHERE not_bot = 1 AND not_self = 1
),
per_image AS (
    SELECT k.image_id,
           SUM(CASE WHEN ${distinct_users} = 1
                    THEN CASE WHEN k.views > 0 THEN 1 ELSE 0 END ELSE k.views END) AS views,
           SUM(CASE WHEN ${distinct_users} = 1
                    THEN CASE WHEN k.remixes > 0 THEN 1 ELSE 0 END ELSE k.remixes END)
               AS remixes,
           SUM(CASE WHEN k.remixes > 0 AND t.user_id IS NOT NULL THEN 1 ELSE 0 END)
               AS top_creator_remixers
    FROM kept k
    LEFT JOIN top_creators t ON k.user_id = t.user_id
    GROUP BY k.image_id
),
stats AS (
    SELECT i.image_id, i.prompt_id, i.prompt, i.path, i.creator_id, i.posted_at, i.posted_s,
           COALESCE(p.views, 0) AS views,
           COALESCE(p.remixes, 0) AS remixes,
           COALESCE(p.top_creator_remixers, 0) AS top_creator_remixers
    FROM images i
    LEFT JOIN per_image p ON i.image_id = p.image_id
),
global_rate AS (
    SELECT CAST(SUM(remixes) AS DOUBLE) / GREATEST(SUM(views), 1) AS rate FROM stats
)
SELECT s.*,
       CASE WHEN '${signal}' = 'remix_rate'
            THEN (s.remixes + ${prior_views} * g.rate) / (s.views + ${prior_views})
            ELSE CAST(s.remixes AS DOUBLE) END AS score,
       (s.remixes >= ${min_remixes_for_positive} AND s.views >= ${min_views_for_positive})
           AS pos_ok,
       (s.views >= ${min_views_for_negative}
        AND s.remixes <= ${max_remixes_for_negative}) AS neg_ok
FROM stats s
CROSS JOIN global_rate g
