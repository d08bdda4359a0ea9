-- Ledger entries of debt (an overdraft capture, a payment of debt by
-- arriving credits) and of a hold's extension. Added alone: a new enum value
-- is usable only once its transaction committed.
alter type private.entry_kind add value 'overdraft';
alter type private.entry_kind add value 'debt_payment';
alter type private.entry_kind add value 'extend';
