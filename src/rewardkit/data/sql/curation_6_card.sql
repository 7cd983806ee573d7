-- The dataset card's counts per stage, one row; each column is a card entry.
-- Inputs: events, images and the stage tables (user_behaviour, bots, image_user,
-- top_creators, image_scores, candidates). Counts of the log before the SQL (events read,
-- dropped by the schema rules) come from data/log_schema.py.
SELECT
    (SELECT COUNT(*) FROM events e LEFT JOIN images i ON e.image_id = i.image_id
     WHERE i.image_id IS NULL) AS events_unknown_image,
    (SELECT COALESCE(SUM(events * not_bot), 0) FROM image_user) AS events_after_bot_filter,
    (SELECT COALESCE(SUM(events * not_bot * not_self), 0) FROM image_user)
        AS events_after_self_remix_filter,
    (SELECT COUNT(*) FROM user_behaviour WHERE remixes >= ${min_remixes})
        AS users_checked_for_bots,
    (SELECT COUNT(*) FROM bots) AS users_flagged_bots,
    (SELECT COUNT(*) FROM top_creators) AS top_creators,
    (SELECT COUNT(*) FROM image_scores) AS images,
    (SELECT COUNT(DISTINCT prompt_id) FROM image_scores) AS prompts,
    (SELECT COUNT(*) FROM image_scores WHERE views + remixes > 0) AS images_scored,
    (SELECT COUNT(*) FROM image_scores WHERE pos_ok) AS images_eligible_positive,
    (SELECT COUNT(*) FROM image_scores WHERE neg_ok) AS images_eligible_negative,
    (SELECT COUNT(*) FROM candidates) AS candidate_pairs
