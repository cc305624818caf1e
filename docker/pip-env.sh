# Sourced (POSIX sh) by the Dockerfiles' RUN steps before pip runs. Both inputs are optional and never
# stored in a layer: the build secret `cacert` (a CA bundle, for a TLS-intercepting proxy in front of the
# index) and the `wheels` build context (a folder of local wheels, e.g. the torch CPU wheel).
if [ -s /run/secrets/cacert ]; then
  export PIP_CERT=/run/secrets/cacert
fi
if [ -d /wheels ] && [ -n "$(ls -A /wheels 2>/dev/null)" ]; then
  export PIP_FIND_LINKS=/wheels
fi
