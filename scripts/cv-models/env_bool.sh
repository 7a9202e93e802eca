# Boolean env vars of the card's bash wrappers (sourced by them): 1/true/yes or 0/false/no, any case;
# anything else is an error naming the variable.

# env_bool NAME: print 1 or 0 for the env var NAME (unset: 0), or fail naming it.
env_bool() {
  local value="${!1:-0}"
  case "${value,,}" in
    1|true|yes) echo 1 ;;
    0|false|no|"") echo 0 ;;
    *) echo "error: $1='$value' is not a boolean (use 1/true/yes or 0/false/no)" >&2; return 2 ;;
  esac
}

# bool_flag NAME FLAG: append FLAG to the caller's args array when the env var NAME is on.
bool_flag() {
  local on
  on="$(env_bool "$1")" || exit 2
  if [[ "$on" == 1 ]]; then args+=("$2"); fi
}
