"""Running fedseg on a real Flower deployment: the site's SuperExec and the pilot PKI."""
