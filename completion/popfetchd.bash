# bash completion for popfetchd(8): commands, options, configuration ids, and
# for import the kind of file, the file and the -o directory.
# The ids are read from DIR/conf.d/*.yaml and *.yml of the -c DIR on the
# line (default /etc/popfetchd): the file's top-level "id:", else its name.

_popfetchd_confdir()
{
	local i dir=/etc/popfetchd
	for ((i = 1; i < COMP_CWORD; i++)); do
		case ${COMP_WORDS[i]} in
		-c | --config) ((i + 1 < COMP_CWORD)) && dir=${COMP_WORDS[i + 1]} ;;
		--config=*) dir=${COMP_WORDS[i]#--config=} ;;
		esac
	done
	printf '%s\n' "${dir/#\~/$HOME}"
}

_popfetchd_ids()
{
	local f id dir
	dir=$(_popfetchd_confdir)
	for f in "$dir"/conf.d/*.yaml "$dir"/conf.d/*.yml; do
		[[ -f $f ]] || continue
		id=$(sed -n -E "s/^id:[[:space:]]*[\"']?([A-Za-z0-9_.-]+)[\"']?[[:space:]]*(#.*)?\$/\\1/p" \
			"$f" 2>/dev/null | head -n 1)
		if [[ -z $id ]]; then
			id=${f##*/}
			id=${id%.*}
		fi
		printf '%s\n' "$id"
	done
}

# import KIND FILE: the kind, then a file name. $1: the index of "import".
_popfetchd_import()
{
	local i n=0
	for ((i = $1 + 1; i < COMP_CWORD; i++)); do
		case ${COMP_WORDS[i]} in
		-o | --output | -c | --config) ((i++)) ;;
		-*) ;;
		*) ((n++)) ;;
		esac
	done
	if ((n == 0)); then
		mapfile -t COMPREPLY < <(compgen -W 'mpoprc fetchmailrc' -- "$cur")
	elif ((n == 1)); then
		compopt -o filenames 2>/dev/null
		mapfile -t COMPREPLY < <(compgen -f -- "$cur")
	fi
}

_popfetchd()
{
	local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
	local commands='run check test receive receive-all status import'
	local options='-c --config -v --verbose -q --quiet --json --all --version --help'
	local i word command=

	COMPREPLY=()
	if [[ $prev == -c || $prev == --config || $prev == -o || $prev == --output ]]; then
		compopt -o filenames 2>/dev/null
		mapfile -t COMPREPLY < <(compgen -d -- "$cur")
		return 0
	fi
	for ((i = 1; i < COMP_CWORD; i++)); do
		word=${COMP_WORDS[i]}
		case $word in
		-c | --config | -o | --output) ((i++)) ;;
		-*) ;;
		*)
			command=$word
			break
			;;
		esac
	done
	if [[ $cur == -* ]]; then
		[[ $command == import ]] && options='-o --output'
		mapfile -t COMPREPLY < <(compgen -W "$options" -- "$cur")
		return 0
	fi
	case $command in
	'') mapfile -t COMPREPLY < <(compgen -W "$commands" -- "$cur") ;;
	test | receive | status)
		# one id: none once it is there
		local n=0
		for ((i = i + 1; i < COMP_CWORD; i++)); do
			case ${COMP_WORDS[i]} in
			-c | --config) ((i++)) ;;
			-*) ;;
			*) ((n++)) ;;
			esac
		done
		((n == 0)) && mapfile -t COMPREPLY < <(compgen -W "$(_popfetchd_ids)" -- "$cur")
		;;
	receive-all) mapfile -t COMPREPLY < <(compgen -W "$(_popfetchd_ids)" -- "$cur") ;;
	import) _popfetchd_import "$i" ;;
	esac
	return 0
}

complete -F _popfetchd popfetchd
