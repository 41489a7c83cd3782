-- Restriction log (issue 12): every worker keeps the set of restricted installations in memory,
-- so a restricted installation's scan is refused before its body is read. Like the revocation
-- log, each change takes a number from a sequence; workers poll for numbers past the last one
-- they saw (one index range scan). Enrollment takes one too, so an install_id erased while
-- restricted and enrolled again is seen as unrestricted.
CREATE SEQUENCE installation_restrictions;
ALTER TABLE installations ADD COLUMN restriction_seq bigint;

CREATE FUNCTION installations_number_restriction() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.restriction_seq := nextval('installation_restrictions');
    RETURN NEW;
END
$$;

CREATE TRIGGER installations_restriction_log BEFORE INSERT OR UPDATE OF restricted ON installations
    FOR EACH ROW EXECUTE FUNCTION installations_number_restriction();

CREATE INDEX installations_restriction_seq ON installations (restriction_seq);
-- What a worker loads at start.
CREATE INDEX installations_restricted ON installations (install_id) WHERE restricted;
