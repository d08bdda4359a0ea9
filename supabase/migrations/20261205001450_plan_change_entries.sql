-- A plan change's credits are a ledger entry of their own ('plan_change': a
-- subscription grant of the current period), no longer a promotion. Added
-- alone: a new enum value is usable only once its transaction committed.
alter type private.entry_kind add value 'plan_change';
