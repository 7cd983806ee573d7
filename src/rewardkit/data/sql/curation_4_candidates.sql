-- Stage 4: candidate preference pairs within a prompt. Per prompt only the top max_candidates
-- eligible positives and the bottom max_candidates eligible negatives (by score) are
-- crossed, so a prompt yields at most max_candidates^2 candidates; candidates need a score
-- gap >= margin and posting times within time_window_days; then at most
-- max_pairs_per_prompt are kept (stage 5). h is a portable integer hash of the two ids and
-- the seed (a product of two MINSTD-style residues mod 2^31 - 1; every intermediate fits in
-- a BIGINT), used to sample pairs without bias towards any image.
-- Input: image_scores (stage 3). Output: one row per candidate pair.
WITH pos AS (
    SELECT * FROM (
        SELECT s.*, ROW_NUMBER() OVER (
                   PARTITION BY prompt_id ORDER BY score DESC, image_id) AS r
        FROM image_scores s WHERE pos_ok
    ) x WHERE r <= ${max_candidates}
),
neg AS (
    SELECT * FROM (
        SELECT s.*, ROW_NUMBER() OVER (
                   PARTITION BY prompt_id ORDER BY score ASC, image_id) AS r
        FROM image_scores s WHERE neg_ok
    ) x WHERE r <= ${max_candidates}
),
candidates AS (
    SELECT p.prompt_id, p.prompt,
           p.image_id AS pos_image_id, n.image_id AS neg_image_id,
           p.path AS pos_path, n.path AS neg_path,
           p.score AS pos_score, n.score AS neg_score,
           p.top_creator_remixers AS pos_top_creator_remixers,
           MOD(MOD(MOD(ABS(p.image_id), 2147483647) * 48271
                   + MOD(ABS(n.image_id), 2147483647) * 69621 + ${seed}, 2147483647)
               * MOD(MOD(ABS(n.image_id), 2147483647) * 48271 + ${seed} * 16807 + 1,
                     2147483647),
               2147483647) AS h
    FROM pos p
    JOIN neg n ON p.prompt_id = n.prompt_id AND p.image_id <> n.image_id
    WHERE p.score - n.score >= ${margin}
      AND ABS(p.posted_s - n.posted_s)
          <= ${window_seconds}
)
SELECT * FROM candidates
