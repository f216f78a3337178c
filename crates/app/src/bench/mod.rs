//! `rookery bench`: every performance figure measured beside the machine's own limit.
