-- Stage 5: at most max_pairs_per_prompt candidates per prompt (lowest hash first: a
-- deterministic sample), a weight (1 + creator_bonus when the positive was remixed by a top
-- creator), and one split per prompt from a portable integer hash of prompt_id and the seed
-- (a product of two residues mod 2^31 - 1, squared: the seed reshuffles prompts non-linearly;
-- every intermediate fits in a BIGINT),
-- so that no prompt is in two splits. Input: candidates (stage 4). Output: the pairs.
WITH capped AS (
    SELECT * FROM (
        SELECT c.*, ROW_NUMBER() OVER (PARTITION BY prompt_id ORDER BY h, pos_image_id,
                                                                 neg_image_id) AS k
        FROM candidates c
    ) x WHERE k <= ${max_pairs_per_prompt}
),
prompt_hash AS (
    SELECT prompt_id,
           MOD(MOD(MOD(ABS(prompt_id), 2147483647) * 48271 + ${seed} * 69621 + 1, 2147483647)
               * MOD(MOD(ABS(prompt_id), 2147483647) * 16807 + ${seed} * 48271 + 7,
                     2147483647),
               2147483647) AS x
    FROM (SELECT DISTINCT prompt_id FROM capped) d
),
prompt_bucket AS (
    SELECT prompt_id,
           CAST(MOD(x * x + x * ${seed} + 12345, 2147483647) AS DOUBLE) / 2147483647 AS u
    FROM prompt_hash
)
SELECT c.prompt, c.pos_path, c.neg_path, c.prompt_id, c.pos_image_id, c.neg_image_id,
       c.pos_score, c.neg_score,
       CASE WHEN c.pos_top_creator_remixers > 0 THEN 1.0 + ${creator_bonus} ELSE 1.0 END
           AS weight,
       CASE WHEN b.u < ${train_frac} THEN 'train'
            WHEN b.u < ${train_frac} + ${val_frac} THEN 'val'
            ELSE 'test' END AS split
FROM capped c
JOIN prompt_bucket b ON c.prompt_id = b.prompt_id
ORDER BY c.prompt_id, c.pos_image_id, c.neg_image_id
